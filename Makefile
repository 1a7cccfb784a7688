# One entry point for humans and CI. `make test` is the README's test command and exactly
# what .ci/run runs.
.PHONY: test agent bench deps fmt lint licenses nextest build

# Everything: deps, fmt, clippy, licenses, all tests, bounded fuzzing.
test:
	scripts/test.sh

# Run an embedded agent in the foreground (data in ./blockwarden-data). Extra flags: ARGS="…".
agent:
	cargo run --release -p blockwarden -- agent $(ARGS)

# Benchmarks against qemu-nbd, nbdkit and raw fio (results go to BENCHMARKS.md by hand).
bench:
	@if [ -x scripts/bench.sh ]; then scripts/bench.sh $(ARGS); \
	else echo "scripts/bench.sh does not exist yet" >&2; exit 1; fi

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
