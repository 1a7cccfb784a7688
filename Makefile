# One entry point for humans and CI. `make test` is the README's test command and exactly
# what .ci/run runs.
.PHONY: test agent bench bench-cluster deps fmt lint licenses nextest build

# Everything: deps, fmt, clippy, licenses, all tests, bounded fuzzing.
test:
	scripts/test.sh

# Run an embedded agent in the foreground (data in ./blockwarden-data). Extra flags: ARGS="…".
agent:
	cargo run --release -p blockwarden -- agent $(ARGS)

# Benchmarks against qemu-nbd, nbdkit and raw fio (results go to BENCHMARKS.md by hand).
bench:
	bench/nbd-bench.sh $(ARGS)

# C2 benchmarks: lease takeover, control-plane latency, remote attach (network namespaces, root).
bench-cluster:
	bench/cluster-bench.sh $(ARGS)

build:
	cargo build --workspace --all-targets

deps:
	scripts/install-test-deps.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings

licenses:
	scripts/check-licenses.sh

# Tests only (no deps/fmt/clippy/fuzz); filter with ARGS, e.g. make nextest ARGS="-E 'binary(cli)'".
nextest:
	cargo nextest run --workspace $(ARGS)
