# The xentd image: static, stripped xentd and xent (built with the `otel` feature) on an empty
# base, run as a numeric non-root user, fit for a read-only root file system.
#
#   docker build -t xentd .                    # everything from source (pulls the Rust image)
#   scripts/image                              # binaries built on this machine, no pull
#
# Stages, in this order so that `--target runtime-host` builds without the Rust image with
# BuildKit and with the legacy builder alike (the legacy builder builds every stage before its
# target; the default target therefore needs BuildKit, which skips stages it does not use):
#   runtime-base  what every image holds besides the binaries: user, ports, health check
#   runtime-host  runtime-base plus binaries built on the host by `scripts/image binaries`
#   build         the same `scripts/image binaries` command, in the Rust image
#   runtime       runtime-base plus the binaries of `build` (the default target)
#
# Run: docker run --read-only --cap-drop ALL --security-opt no-new-privileges \
#        -p 50051:50051 -p 9464:9464 xentd
# Every flag of xentd is also an XENT_* environment variable (README, Configuration).

ARG RUST_IMAGE=rust:1.95-bookworm

FROM scratch AS runtime-base
ARG VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="xentd" \
      org.opencontainers.image.description="A gRPC service that evaluates softmax cross-entropy losses and their gradients" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
# nsswitch.conf: host names from /etc/hosts, then DNS (both back ends are inside the static
# glibc); passwd and group name the numeric user for tools that show names.
COPY deploy/image/etc/ /etc/
# Inside a container the listeners must be on every interface: the container's loopback is
# reachable from nowhere but the container itself.
ENV XENT_LISTEN=0.0.0.0:50051 \
    XENT_METRICS_LISTEN=0.0.0.0:9464
# gRPC (Xent, the Open Inference Protocol, health, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
USER 10001:10001
# SERVING only after the warm-up computation gave the right answer, NOT_SERVING while draining.
# `xent health` asks XENT_ADDRESS (default 127.0.0.1:50051): set it too when XENT_LISTEN moves
# the port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/xent", "health", "--timeout", "3"]
# xentd stops on SIGTERM: it turns NOT_SERVING, lets calls in flight finish within
# --shutdown-grace-secs, and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/xentd"]

FROM runtime-base AS runtime-host
COPY target/image/xentd target/image/xent /

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in a layer of their own: the manifests, build.rs and proto/ with
# placeholder sources, so a change under src/ rebuilds only the xent crate.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY scripts/image scripts/image
RUN mkdir -p src/bin benches \
 && touch src/lib.rs \
 && echo 'fn main() {}' > src/bin/xentd.rs \
 && echo 'fn main() {}' > src/bin/xent.rs \
 && echo 'fn main() {}' > benches/kernel.rs \
 && scripts/image binaries /tmp/placeholder \
 && rm -rf /tmp/placeholder src
COPY src src
# COPY keeps the sources' modification times, which can be older than the placeholders'.
RUN find src -name '*.rs' -exec touch {} + \
 && scripts/image binaries /out

FROM runtime-base AS runtime
COPY --from=build /out/xentd /out/xent /
