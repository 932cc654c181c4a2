# Sourced by the other scripts: where caches, native libraries and test models live.
# Everything is outside the clone so CI and later runs reuse it.
export AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$AVA_HOME/target}"
export AVA_LIB_DIR="${AVA_LIB_DIR:-$AVA_HOME/lib}"
export AVA_MIRROR="${AVA_MIRROR:-$AVA_HOME/mirror}"
# The test tier, installed by `model-setup` (scripts/install-models.sh).
export AVA_MODELS="${AVA_MODELS:-$AVA_HOME/models}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO
export AVA_BIN="$CARGO_TARGET_DIR/release/asterisk-voice-agent"
# The shared test audio sits beside the clone; fall back to the bundled copies.
if [ -d "$REPO/../shared/audio" ]; then
  export AVA_AUDIO="${AVA_AUDIO:-$(cd "$REPO/../shared/audio" && pwd)}"
else
  export AVA_AUDIO="${AVA_AUDIO:-$REPO/tests/fixtures}"
fi
