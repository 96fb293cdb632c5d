# xentd in a small runtime image. Build: docker build -t xent .
# Run:   docker run -p 50051:50051 xent
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 xent
COPY --from=build /src/target/release/xentd /src/target/release/xent /usr/local/bin/
USER 10001
# Listen on every interface inside the container; the image is reached through its port.
ENV XENT_LISTEN=0.0.0.0:50051
EXPOSE 50051
# Kubernetes stops pods with SIGTERM: xentd turns NOT_SERVING, drains, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/xentd"]
