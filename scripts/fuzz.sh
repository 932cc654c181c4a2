#!/usr/bin/env bash
# Fuzzes the AudioSocket frame codec and the FastAGI request parser with cargo-fuzz (libFuzzer)
# for a bounded time: SECONDS per target (default 300). Not part of CI. Needs the nightly
# toolchain; installs cargo-fuzz from crates.io when missing. Findings (crashing inputs) land in
# fuzz/artifacts/TARGET/; the corpus in fuzz/corpus/TARGET/ (seeded from the real Asterisk
# captures for the codec). The last lines of each run are libFuzzer's final stats (number of
# executed units, peak RSS): the figures a fuzzing report quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-300}"
AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$AVA_HOME/fuzz-target}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/frame fuzz/corpus/agi
for c in ../shared/audiosocket/*.bin; do
  [ -f "$c" ] && head -c 4096 "$c" > "fuzz/corpus/frame/$(basename "$c")"
done
printf 'agi_network: yes\nagi_network_script: call-start\nagi_callerid: 100\nagi_calleridname: Alice\nagi_arg_1: 3f2504e0-4f89-11d3-9a0c-0305e82c3301\n\n' > fuzz/corpus/agi/call-start
# Built first, in full view: a build error must not hide behind the run's `tail` below.
cargo +nightly fuzz build --fuzz-dir fuzz
for t in frame agi; do
  echo "== fuzzing $t for ${SECS}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 40
done
