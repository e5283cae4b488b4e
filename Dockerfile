# A static, non-root image of fledge: musl build, then nothing but the binary and CA roots.
#   docker build -t ghcr.io/fledge-dev/fledge:0.1.0 .
# The chart's image.repository / image.tag name the result.
FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest names the benches; cargo wants their files even for one binary.
COPY benches ./benches
RUN cargo build --release --locked --bin fledge \
 && strip target/release/fledge

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/fledge /fledge
# The chart runs it with runAsNonRoot and a read-only root filesystem; 65532 is "nonroot".
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/fledge"]
CMD ["serve"]
