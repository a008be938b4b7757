# The aquifer image: `aquifer mount`, `aquifer csi` and the other commands, with fuse3.
#   docker build -t aquifer/aquifer:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends clang libclang-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p aquifer-cli \
    && strip target/release/aquifer

FROM debian:bookworm-slim
# fuse3: fusermount3 for unprivileged mounts; util-linux: umount for the CSI node plugin's
# lazy unmounts; ca-certificates: S3 over TLS; tini: PID 1, which reaps the filesystem
# daemons the node daemon starts (they run in their own sessions, so they are reparented
# to PID 1 when their launcher exits).
RUN apt-get update && apt-get install -y --no-install-recommends fuse3 util-linux ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/aquifer /usr/local/bin/aquifer
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/aquifer"]
