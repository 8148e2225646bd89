# offload-operator: the index of chores. `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
E2E_BIN := e2e/bin

.PHONY: help test fmt fmt-check lint unit e2e build stage-static crds control-plane helm prometheus seaweedfs chart-check cluster-up cluster-down \
	node kueue image demo demo-down bench-e2e bench-compare bench-scale interlink interlink-up interlink-down slurm-up slurm-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

test: fmt-check lint unit chart-check e2e ## everything CI checks: format, clippy, unit tests, chart checks, end-to-end tests

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## fail when the code is not formatted
	$(CARGO) fmt --all -- --check

lint: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## unit tests (no cluster needed), and the operator's and stage tool's own binary tests
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p offload-operator -p offload-stage --test '*'

build: ## build the operator, the stage tool and the site simulator
	$(CARGO) build -p offload-operator -p offload-stage -p offload-e2e --bins

# The stage tool runs in site images of any Linux distribution (Rocky 8, CentOS 7, Ubuntu 20.04):
# a static, position-independent build (glibc linked in; ADR 0016). --target keeps it apart from
# the ordinary builds in the shared target folder, so neither rebuilds the other.
STAGE_TARGET := x86_64-unknown-linux-gnu
STAGE_STATIC := $${CARGO_TARGET_DIR:-target}/$(STAGE_TARGET)/release/offload-stage
stage-static: ## the stage tool as a static binary (release), as the image ships it
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked -p offload-stage --target $(STAGE_TARGET)

crds: build ## regenerate crds/ (and the chart's copy) from the Rust types (unit tests fail when they are stale)
	$${CARGO_TARGET_DIR:-target}/debug/offload-operator crds --out-dir crds
	$${CARGO_TARGET_DIR:-target}/debug/offload-operator crds --reference > docs/crds.md
	rm -f helm/offload-operator/crds/*.yaml && cp crds/*.yaml helm/offload-operator/crds/

control-plane: ## build (once) the Kubernetes control-plane binaries into the cache folder
	$(E2E_BIN)/build-control-plane

node: control-plane ## build (once) the real node's kubelet, kube-proxy, containerd, runc and pause image into the cache folder
	$(E2E_BIN)/build-node >/dev/null

kueue: ## build (once) Kueue's controller manager, with its CRDs and webhook manifests, into the cache folder
	$(E2E_BIN)/build-kueue >/dev/null

seaweedfs: ## build (once) SeaweedFS, the S3-compatible store of the data tests, into the cache folder
	$(E2E_BIN)/build-seaweedfs >/dev/null

helm: ## build (once) Helm into the cache folder
	$(E2E_BIN)/build-helm >/dev/null

prometheus: ## fetch (once) Debian's promtool and prometheus into the cache folder, unpacked, not installed
	$(E2E_BIN)/install-prometheus >/dev/null

chart-check: control-plane helm prometheus ## helm lint, renders dry-run on a real API server, RBAC check, promtool, dashboard metric names
	$(E2E_BIN)/chart-check

# One control plane shared by every e2e test binary, stopped however the run ends, and the real
# interLink chain (Slurm, SLURM plugin, interLink API server) for interlink_slurm: built from the
# upstream sources in ../shared/upstream (else the Go module proxy or a local git repository; see
# e2e/bin/build-interlink). A chain that cannot be built or started fails the run with the reason.
# E2E_SKIP_INTERLINK=1 leaves the chain out on purpose (a machine without the sources): the run then
# says so and skips that one test by name, so it is never reported as passed.
# Helm and Prometheus are for the chart and Prometheus tests. The operator image (make image) and a
# real node (e2e/bin/build-node; node-up is started by the in_cluster test itself, node-down here
# too in case the test binary died) are for the in-cluster install test. Kueue (e2e/bin/build-kueue;
# kueue-up is started by the kueue test, kueue-down here too) is for the Kueue test. SeaweedFS
# (e2e/bin/build-seaweedfs; s3-up is started by the data test, stopped by it or its reaper) is the
# object store of the data test.
INTERLINK_TEST := pods_and_remote_jobs_run_as_real_slurm_jobs
e2e: control-plane helm prometheus build image node kueue seaweedfs ## end-to-end tests against a real control plane, a real node and the real interLink + Slurm chain
	@dir=$$(mktemp -d /tmp/offload-e2e-make.XXXXXX); \
	trap '$(E2E_BIN)/interlink-down "'"$$dir"'/interlink"; $(E2E_BIN)/kueue-down "'"$$dir"'"; $(E2E_BIN)/node-down "'"$$dir"'"; $(E2E_BIN)/cluster-down "'"$$dir"'"' EXIT; \
	E2E_FAST_NODE_LIFECYCLE=1 $(E2E_BIN)/cluster-up "$$dir" >/dev/null; \
	il=""; skip=""; \
	if [[ -n "$${E2E_SKIP_INTERLINK:-}" ]]; then \
	  echo "make e2e: E2E_SKIP_INTERLINK is set: the real interLink chain is not started and $(INTERLINK_TEST) is SKIPPED" >&2; \
	  skip="--skip $(INTERLINK_TEST)"; \
	else \
	  $(E2E_BIN)/build-interlink >/dev/null || { echo "make e2e: the interLink chain cannot be built (reason above); E2E_SKIP_INTERLINK=1 runs without it" >&2; exit 1; }; \
	  il=$$($(E2E_BIN)/interlink-up "$$dir/interlink" | tail -n 1) || { echo "make e2e: the interLink chain did not start (logs in $$dir/interlink)" >&2; exit 1; }; \
	fi; \
	OFFLOAD_E2E_CLUSTER="$$dir" OFFLOAD_E2E_INTERLINK="$$il" $(CARGO) test -p offload-e2e --tests -- $$skip $(E2E_ARGS)

bench-e2e: control-plane ## end-to-end load benchmarks (RemoteJobs, offloaded pods; release build); they print numbers
	$(CARGO) build --release -p offload-operator -p offload-e2e --bins
	@dir=$$(mktemp -d /tmp/offload-bench.XXXXXX); \
	trap '$(E2E_BIN)/cluster-down "'"$$dir"'"' EXIT; \
	$(E2E_BIN)/cluster-up "$$dir" >/dev/null; \
	OFFLOAD_E2E_CLUSTER="$$dir" $(CARGO) test --release -p offload-e2e --test load -- --ignored --nocapture --test-threads=1

bench-compare: control-plane ## interLink's virtual kubelet vs offload-operator vs a floor on the same workload (release build); prints the table
	$(CARGO) build --release -p offload-operator -p offload-e2e --bins
	@vk="$$($(E2E_BIN)/build-interlink | tail -n 1)/virtual-kubelet"; \
	dir=$$(mktemp -d /tmp/offload-compare.XXXXXX); \
	trap '$(E2E_BIN)/cluster-down "'"$$dir"'"' EXIT; \
	$(E2E_BIN)/cluster-up "$$dir" >/dev/null; \
	OFFLOAD_VK_BIN="$$vk" OFFLOAD_E2E_TEST_TIMEOUT=7200 OFFLOAD_E2E_CLUSTER="$$dir" \
	  $(CARGO) test --release -p offload-e2e --test compare -- --ignored --nocapture --test-threads=1 \
	  $${COMPARE_WORKLOADS:-burst_on_one_site twenty_sites}

bench-scale: control-plane ## the operator alone with 10,000 pods over 10 sites (release build); prints memory, CPU and status-sync time
	$(CARGO) build --release -p offload-operator -p offload-e2e --bins
	@dir=$$(mktemp -d /tmp/offload-scale.XXXXXX); \
	trap '$(E2E_BIN)/cluster-down "'"$$dir"'"' EXIT; \
	$(E2E_BIN)/cluster-up "$$dir" >/dev/null; \
	OFFLOAD_E2E_TEST_TIMEOUT=7200 OFFLOAD_E2E_CLUSTER="$$dir" \
	  $(CARGO) test --release -p offload-e2e --test compare -- --ignored --nocapture --test-threads=1 operator_at_scale

image: stage-static ## the operator image as an OCI archive in the cache folder, without a Docker daemon (release build; ADR 0010)
	$(CARGO) build --release --locked -p offload-operator
	@STAGE_BINARY=$(STAGE_STATIC) $(E2E_BIN)/build-image >/dev/null

cluster-up: ## start a control plane (state in .cluster/ or $$OFFLOAD_CLUSTER_DIR); prints the kubeconfig path
	@$(E2E_BIN)/cluster-up

cluster-down: ## stop the control plane started by cluster-up and remove its state
	@$(E2E_BIN)/cluster-down

demo: control-plane build ## control plane + 3 simulated sites + the operator; applies examples/ and narrates (Ctrl-C stops)
	$(E2E_BIN)/demo

demo-down: ## stop a demo started elsewhere and remove its state (.demo/)
	$(E2E_BIN)/demo --down

interlink: ## build (once) the interLink API server, virtual kubelet and SLURM plugin into the cache folder
	$(E2E_BIN)/build-interlink

interlink-up: ## start Slurm, the interLink SLURM plugin and API server (state in .interlink/); prints the env file
	@$(E2E_BIN)/interlink-up

interlink-down: ## stop what interlink-up started and remove its state
	@$(E2E_BIN)/interlink-down

slurm-up: ## start a single-host Slurm (state in .slurm/)
	@$(E2E_BIN)/slurm-up

slurm-down: ## stop the Slurm started by slurm-up
	@$(E2E_BIN)/slurm-down
