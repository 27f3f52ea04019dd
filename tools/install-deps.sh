#!/usr/bin/env bash
# Installs the Debian packages ExpertMesh builds with, when any is missing. Run as root.
set -euo pipefail
PKGS=(build-essential cmake ninja-build ccache pkg-config git curl python3 python3-venv
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
      libboost1.81-dev libboost-json1.81-dev libabsl-dev
      libgtest-dev libgmock-dev libbenchmark-dev libpcre2-dev libicu-dev libsimdjson-dev libspdlog-dev
      libcli11-dev libhwy-dev libtbb-dev libopenblas-dev
      clang libclang-rt-14-dev clang-format)
# Model tools: the English text tools/corpus/build_corpus.py extracts (KJV, fortunes, GCIDE).
PKGS+=(bible-kjv bible-kjv-text fortunes fortunes-min dict-gcide)
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
