# syntax=docker/dockerfile:1
# The flowledger image: `docker build -t flowledger .` (docs/OPERATIONS.md,
# "Containers"). Two stages: the release build, then a slim runtime with the
# binary, the workflow registry and the example configuration.

# Cargo.toml: edition 2021, rust-version 1.89; rust:1 is the newest stable 1.x
FROM rust:1-bookworm AS builder
WORKDIR /build
# what the build reads: the manifests, the sources, the migrations
# (embedded by sqlx::migrate!), and tests/ (Cargo.toml names the
# integration test's path; it is not built here)
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY tests tests
# the registry and the target directory are cached between builds
# (BuildKit); the binary is copied out of the cached target
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin flowledger \
    && install -m 0755 target/release/flowledger /usr/local/bin/flowledger

FROM debian:bookworm-slim
# ca-certificates: outgoing HTTPS (steps, callbacks, Vault) checks the
# platform roots; curl: the HEALTHCHECK below
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# a system user without a login shell; /var/lib/flowledger is where the
# compose file keeps its generated development keys
RUN groupadd --system --gid 10001 flowledger \
    && useradd --system --uid 10001 --gid flowledger --home-dir /app \
       --shell /usr/sbin/nologin flowledger \
    && mkdir -p /app /var/lib/flowledger/keys \
    && chown flowledger:flowledger /var/lib/flowledger /var/lib/flowledger/keys
COPY --from=builder /usr/local/bin/flowledger /usr/local/bin/flowledger
# `serve` reads workflows/registry.json relative to its working directory
# (--registry, FLOWLEDGER_REGISTRY); config/example.toml has the
# development clients (tokens dev-billing-token, dev-operator-token): give
# production its own file with --config
WORKDIR /app
COPY workflows workflows
COPY config config
USER flowledger
# the default 127.0.0.1:8080 would not be reachable from outside the
# container; a --http flag wins over this variable
ENV FLOWLEDGER_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
# liveness only: /readyz also needs NATS (docs/OPERATIONS.md, "Probes")
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/livez || exit 1
# SIGTERM drains (handler.drain_grace_seconds, 30 s in the example): stop
# with a longer timeout than Docker's 10 s, e.g. `docker stop -t 40`
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowledger"]
CMD ["serve", "--config", "config/example.toml"]
