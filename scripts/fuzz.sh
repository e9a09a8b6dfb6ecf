#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer, on the stable toolchain (no cargo-fuzz needed:
# the coverage instrumentation is rustc's own sancov pass).
#
#   scripts/fuzz.sh TARGET SECONDS [libFuzzer options]   fuzz one target
#   scripts/fuzz.sh --smoke SECONDS                      every target, SECONDS each, then
#                                                        every saved crash input replayed
#   scripts/fuzz.sh --list                               the targets
#
# Each target starts from its seeds (fuzz/seeds/TARGET, committed) and the corpus it grew
# before (fuzz/corpus/TARGET, not committed). Limits: 10 s per input, 2 GiB of memory.
# A crash, hang or out-of-memory input is written to fuzz/artifacts/TARGET/ and the run
# fails; once fixed, the input goes to fuzz/regressions/TARGET/ (replayed by --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^routelm-fuzz$'; }

if [ "${1:-}" = "--list" ]; then targets; exit 0; fi
if [ $# -lt 2 ]; then
  sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# an explicit --target keeps the instrumentation out of build scripts and proc-macros
cargo build --release --manifest-path fuzz/Cargo.toml --target "$triple" --bins
bin="fuzz/target/$triple/release"
export ROUTELM_NO_PROGRESS=1

run() { # target seconds [options]
  local t=$1 secs=$2
  shift 2
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  "$bin/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -max_total_time="$secs" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -artifact_prefix="fuzz/artifacts/$t/" \
    -print_final_stats=1 "$@"
}

if [ "$1" = "--smoke" ]; then
  for t in $(targets); do
    echo "== fuzz $t for $2 s"
    run "$t" "$2" 2>&1 | grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|==|INFO: Seed)' || true
    # a failed run leaves its input in the artifacts folder
    if [ -n "$(ls -A "fuzz/artifacts/$t")" ]; then
      echo "fuzz target $t failed; inputs in fuzz/artifacts/$t" >&2
      exit 1
    fi
    if [ -d "fuzz/regressions/$t" ]; then
      echo "== replay fuzz/regressions/$t"
      "$bin/$t" -runs=1 -timeout=10 -rss_limit_mb=2048 fuzz/regressions/$t/*
    fi
  done
  exit 0
fi

t=$1
if ! targets | grep -qx "$t"; then
  echo "unknown fuzz target '$t'; the targets are: $(targets | tr '\n' ' ')" >&2
  exit 2
fi
secs=$2
shift 2
run "$t" "$secs" "$@"
