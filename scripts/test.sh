#!/usr/bin/env bash
# The one test command (README, `make test`, and CI's .ci/run all run exactly this):
#   1. install missing test tools (distribution packages)   scripts/install-test-deps.sh
#   2. formatting                                           cargo fmt --check
#   3. lints                                                cargo clippy -D warnings
#   4. dependency licenses                                  scripts/check-licenses.sh
#   5. every test: unit, protocol, end-to-end               cargo nextest run --workspace
#   6. bounded fuzzing of the NBD codec (if fuzz/ exists)   cargo fuzz run, 30 s per target
# Every step runs even if an earlier one failed (so one run shows everything); the summary at
# the end lists each step, and the exit status is non-zero if any failed.
# Knobs: BW_SKIP_DEPS=1, BW_SKIP_FUZZ=1, BW_FUZZ_SECONDS=30, NEXTEST_ARGS="…" (extra args,
# e.g. a filter).
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
PROFILE=default
if [ -n "${CI:-}" ] && [ "${CI}" != "false" ] && [ "${CI}" != "0" ]; then PROFILE=ci; fi
FUZZ_SECONDS="${BW_FUZZ_SECONDS:-30}"

declare -a RESULTS=()
FAILED=0
step() {
  local name="$1"; shift
  echo
  echo "==================== ${name} ===================="
  local t0=$SECONDS
  if "$@"; then
    RESULTS+=("PASS  ${name} ($((SECONDS - t0)) s)")
  else
    RESULTS+=("FAIL  ${name} ($((SECONDS - t0)) s)")
    FAILED=1
  fi
}

fuzz() (  # a subshell: the environment it sets stays inside
  if [ ! -f fuzz/Cargo.toml ]; then
    echo "no fuzz/Cargo.toml: nothing to fuzz"; return 0
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz || return 1
  fi
  local targets ok=0
  # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the pinned stable toolchain do it.
  export RUSTC_BOOTSTRAP=1
  targets=$(cargo fuzz list) || return 1
  if [ -z "$targets" ]; then echo "fuzz/: no targets"; return 1; fi
  for t in $targets; do
    echo "--- fuzz target $t (${FUZZ_SECONDS} s)"
    if ! cargo fuzz run "$t" -- \
          -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=10; then
      echo "fuzz target $t FAILED (artifacts in fuzz/artifacts/$t)"; ok=1
    fi
  done
  return $ok
)

if [ -z "${BW_SKIP_DEPS:-}" ]; then
  step "install test deps" scripts/install-test-deps.sh
fi
step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "licenses" scripts/check-licenses.sh
# shellcheck disable=SC2086
step "cargo nextest (profile ${PROFILE})" cargo nextest run --workspace --locked --profile "$PROFILE" ${NEXTEST_ARGS:-}
if [ -z "${BW_SKIP_FUZZ:-}" ]; then
  step "fuzz NBD codec (${FUZZ_SECONDS} s per target)" fuzz
fi

echo
echo "==================== summary ===================="
for r in "${RESULTS[@]}"; do echo "$r"; done
if [ "$FAILED" -ne 0 ]; then
  echo "RESULT: FAILED"
  exit 1
fi
echo "RESULT: all steps passed"
