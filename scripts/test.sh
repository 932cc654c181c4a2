#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, native libs, test models),
# builds, and runs the unit and end-to-end tests against the real models over loopback.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$REPO/scripts/setup.sh"
cd "$REPO"
cargo test --release --locked --no-fail-fast -- --test-threads=1 "$@"
