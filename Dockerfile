# ExpertMesh: one image with every service binary (router-service, expert-service,
# attention-service, gateway) and the `expertmesh` CLI, on Debian 12. CPU build; see
# Dockerfile.cuda for the CUDA one.
#
#   docker build -t expertmesh:latest .                  # no model: mount one (k8s/overlays/deepseek-v3)
#   docker build -t expertmesh:tiny --target tiny .      # + models/expertmesh-tiny at /models (demo)
#
# The builder caches compiler output with ccache in a BuildKit cache mount, so a rebuild after a
# source change recompiles only what changed (DOCKER_BUILDKIT=1, or buildx). The container runs
# one binary as the unprivileged user 10001 with no shell involved: the command is the binary
# (exec form), and the Kubernetes manifests use native gRPC probes and a `sleep` preStop action.

# ---- builder: the project's own dependency script and CMake preset ----------------------------
FROM debian:bookworm AS builder
COPY tools/install-deps.sh /src/tools/install-deps.sh
RUN /src/tools/install-deps.sh --build-only && rm -rf /var/lib/apt/lists/*
COPY . /src
WORKDIR /src
ENV CCACHE_DIR=/root/.cache/ccache CCACHE_BASEDIR=/src CCACHE_MAXSIZE=2G
ARG JOBS=
# Only the binaries the image ships: no tests (tests/ is not in the context), no benchmarks.
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake --preset cpu -DEXPERTMESH_BENCHMARKS=OFF >/dev/null \
 && cmake --build --preset cpu -j "${JOBS:-$(nproc)}" \
      --target router-service expert-service attention-service gateway expertmesh \
 && mkdir -p /out/bin \
 && cp build/cpu/router/router-service build/cpu/expert-service/expert-service \
       build/cpu/attention-service/attention-service build/cpu/gateway/gateway \
       build/cpu/tools/cli/expertmesh /out/bin/ \
 && strip /out/bin/* \
 && { ccache --show-stats | grep -Ei 'hits|misses' || :; }

# ---- base: the runtime shared libraries only (from `ldd` of the five binaries) ---------------
FROM debian:bookworm-slim AS base
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libabsl20220623 libboost-json1.81.0 libc-ares2 libfmt9 libgrpc++1.51 libgrpc29 libhwy1 \
      libicu72 libpcre2-8-0 libprotobuf32 libre2-9 libspdlog1.10 libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin expertmesh
COPY --from=builder /out/bin/ /usr/local/bin/
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ExpertMesh" \
      org.opencontainers.image.description="DeepSeek-V3-architecture MoE serving across expert shards over gRPC: router-service, expert-service, attention-service, gateway and the expertmesh CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
USER 10001:10001
# Fails the build when a binary needs a library the list above lacks, or when the user the
# containers run as cannot find and run it (a base image whose "/" is 0700 passes as root).
RUN for p in /usr/local/bin/*; do b=$(basename "$p"); \
      [ "$(command -v "$b")" = "$p" ] || { echo "$b: not on the PATH of user 10001" >&2; exit 1; }; \
      ! ldd "$p" | grep 'not found' || exit 1; "$b" --help >/dev/null || exit 1; done
WORKDIR /tmp
# The ports k8s/ uses: gRPC of router 7000, attention 7001, gateway 7002, shard group k 7100+k
# (its framed TCP data plane 7300+k);
# the gateway's HTTP API 8000; /metrics of router 9000, attention 9001, shard group k 9100+k.
EXPOSE 7000 7001 7002 7100 7300 8000 9000 9001 9100
CMD ["expertmesh", "--help"]

# ---- tiny: + the bundled demo model (k8s/overlays/cpu-tiny, tools/docker-test.sh) ------------
FROM base AS tiny
COPY --chown=0:0 models/expertmesh-tiny /models/expertmesh-tiny
LABEL org.opencontainers.image.description="ExpertMesh with the bundled expertmesh-tiny model at /models/expertmesh-tiny (demo)"

# ---- runtime (default): no model; mount one at /models --------------------------------------
FROM base AS runtime
