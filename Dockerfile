# The offload-operator image, for machines with a container engine and registry access.
#
# `make image` builds the same filesystem without a Docker daemon or any registry (ADR 0010):
# the release binary, the C runtime it links (glibc, libgcc), CA certificates and a non-root user,
# nothing else: no shell, no package manager. Keep the two in step.
#
#   docker build -t offload-operator:0.1.0 .

# Build on the same Debian release the runtime's libraries come from (glibc 2.36).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY operator operator
COPY stage stage
COPY e2e e2e
# The stage tool static (glibc linked in), to run in any site image (ADR 0016); as `make stage-static`.
RUN cargo build --release --locked -p offload-operator \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p offload-stage --target x86_64-unknown-linux-gnu \
 && strip target/release/offload-operator target/x86_64-unknown-linux-gnu/release/offload-stage

# distroless/cc: glibc, libgcc, CA certificates, /etc/passwd with `nonroot` (65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/offload-operator /usr/bin/offload-operator
# The stage tool RemoteJob pods with inputs or outputs run (ADR 0014).
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/offload-stage /usr/bin/offload-stage
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENTRYPOINT ["/usr/bin/offload-operator"]
CMD ["run"]
