# pgsplit and the album demo app, built in one Rust stage, each shipped in its own slim image.
#
#   docker build --target pgsplit -t pgsplit .        # the proxy; config at /etc/pgsplit/proxy.toml
#   docker build --target app -t pgsplit-demo-app .   # the demo app; needs DATABASE_URL
#
# docker-compose.yaml builds both and runs them with the primary, two replicas and Redis.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY app-example ./app-example
# Cargo.toml declares the benchmarks: cargo reads their files with the manifest.
COPY benches ./benches
RUN cargo build --release --locked --bin pgsplit --bin app-example

FROM debian:12-slim AS pgsplit
RUN useradd --system --no-create-home --shell /usr/sbin/nologin pgsplit
COPY --from=builder /src/target/release/pgsplit /usr/local/bin/pgsplit
USER pgsplit
EXPOSE 6432
ENTRYPOINT ["pgsplit"]
CMD ["--config", "/etc/pgsplit/proxy.toml"]

FROM debian:12-slim AS app
RUN useradd --system --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /src/target/release/app-example /usr/local/bin/app-example
USER app
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["app-example"]
