#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: target/debian/asterisk-voice-agent_*.deb.
# Installs cargo-deb from crates.io when missing; bundles libvosk.so and libonnxruntime.so.1
# from the wheels (scripts/install-deps.sh) into /usr/lib/asterisk-voice-agent (the rpath).
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$REPO/scripts/install-deps.sh"
cd "$REPO"
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
cargo build --release --locked
mkdir -p "$CARGO_TARGET_DIR/release/deb-libs"
cp "$AVA_LIB_DIR/libvosk.so" "$AVA_LIB_DIR/libonnxruntime.so.1" "$CARGO_TARGET_DIR/release/deb-libs/"
cargo deb --no-build --output "$CARGO_TARGET_DIR/debian/" "$@"
ls -l "$CARGO_TARGET_DIR"/debian/*.deb
