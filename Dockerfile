# push-manager in a container: `docker build -t push-manager .`, or `docker compose up --build`
# with compose.yaml beside this file. The image runs one role per container:
# `docker run push-manager serve ...` or `docker run push-manager node ...`.

# Build: the release profile only (gRPC's C core takes far longer in any other). cmake, g++,
# pkg-config and libssl-dev build grpcio-sys against the system OpenSSL; protoc is vendored.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin push-manager \
    && cp target/release/push-manager /usr/local/bin/push-manager

# Run: a slim Debian with the OpenSSL the binary links, as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin push-manager
COPY --from=build /usr/local/bin/push-manager /usr/local/bin/push-manager
USER push-manager
# serve: PushServer gRPC, admin. node: ConnectNode gRPC, WebSocket, admin.
EXPOSE 50053 9253 50061 8090 9254
# SIGTERM is the orderly stop (deregister, drain); give `docker stop` time for it (-t 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/push-manager"]
CMD ["--help"]
