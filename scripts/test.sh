#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, native libs, test models),
# builds, and runs the unit and end-to-end tests against the real models over loopback.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$REPO/scripts/install-deps.sh"
cd "$REPO"
cargo build --release --locked
AVA_BIN="$AVA_BIN" "$REPO/scripts/install-models.sh" "$AVA_MODELS"
cargo test --release --locked --no-fail-fast -- --test-threads=1 "$@"
