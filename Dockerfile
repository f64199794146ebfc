# syntax=docker/dockerfile:1
# The image the Helm chart runs: one `tailgate` binary (gateway, ingester,
# rules tools) on a small Debian base, as an unprivileged user.
#
#   docker build -t ghcr.io/tailgate/tailgate:0.1.0 .

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and the build cache between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tailgate \
    && install -D -m 0755 target/release/tailgate /out/tailgate

# The Debian 12 glibc base the binary was built against, without a shell or
# package manager; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tailgate /usr/local/bin/tailgate
COPY sampling-rules/examples/default.yaml /etc/tailgate/rules/rules.yaml
USER 65532:65532
# OTLP gRPC, OTLP HTTP, peers, gateway admin, ingester admin.
EXPOSE 4317 4318 4319 8888 8889
ENTRYPOINT ["/usr/local/bin/tailgate"]
CMD ["gateway"]
