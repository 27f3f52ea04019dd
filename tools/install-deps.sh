#!/usr/bin/env bash
# Installs the Debian 12 packages ExpertMesh builds, tests and demos with, when any is missing.
# Run as root (or with sudo). Only what cmake/Dependencies.cmake, the CMakeLists.txt files and
# the scripts tools/test.sh and tools/demo.sh run actually use; CUDA and NCCL come with the machine.
#   --build-only  only the compilers, CMake/Ninja/ccache and the libraries: what the Dockerfile's
#                 builder stage needs to build the services and the CLI;
#   --docker      everything, plus what tools/docker-setup.sh needs to build and run the container
#                 image: Debian's docker.io (dockerd, containerd, runc) and debootstrap (base
#                 images made from Debian's archive where no container registry answers).
# EXPERTMESH_BOOST (default 1.81, Debian 12's) names another Boost where the distribution has
# no 1.81 (Dockerfile.cuda's Ubuntu 24.04 base: 1.83).
set -euo pipefail
boost=${EXPERTMESH_BOOST:-1.81}
# Build toolchain: compilers, CMake presets (Ninja), ccache, pkg-config (PCRE2 and ICU are found
# with it).
BUILD=(build-essential cmake ninja-build ccache pkg-config)
# Test and demo tools: clang + libclang-rt (libFuzzer, tools/fuzz.sh); clang-format and git
# (tools/format-check.sh); curl and python3 (tools/demo.sh); python3-venv (tools/test.sh's
# .venv-test for the openai client and kubernetes-validate); chromium (router_page_test loads
# the router's operator page in headless Chromium; skipped without it).
TOOLS=(git curl python3 python3-venv clang libclang-rt-14-dev clang-format chromium)
# Libraries found in cmake/Dependencies.cmake: gRPC + protobuf (services), Boost (JSON, Beast,
# Asio), Abseil, GoogleTest/GoogleMock, Google Benchmark (find_package'd when
# EXPERTMESH_BENCHMARKS), PCRE2 + ICU (tokenizer), spdlog, CLI11, Highway (SIMD kernels),
# OpenSSL libcrypto (constant-time API-key checks in the gateway).
LIBS=(libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
      libboost${boost}-dev libboost-json${boost}-dev libabsl-dev
      libgtest-dev libgmock-dev libbenchmark-dev libpcre2-dev libicu-dev libspdlog-dev
      libcli11-dev libhwy-dev libssl-dev)
# Model tools: the redistributable English text tools/corpus/build_corpus.py extracts (KJV,
# WordNet 3.0, The Devil's Dictionary, the Jargon File; licences in models/README.md).
CORPUS=(bible-kjv bible-kjv-text wordnet-base dict-devil dict-jargon)
case "${1:-}" in
  "") PKGS=("${BUILD[@]}" "${TOOLS[@]}" "${LIBS[@]}" "${CORPUS[@]}") ;;
  --build-only) PKGS=("${BUILD[@]}" "${LIBS[@]}") ;;
  --docker) PKGS=("${BUILD[@]}" "${TOOLS[@]}" "${LIBS[@]}" "${CORPUS[@]}" docker.io debootstrap) ;;
  *) echo "usage: $0 [--build-only | --docker]" >&2; exit 2 ;;
esac
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
