#!/usr/bin/env bash
# issue 10: an OpenAI-compatible inference server for the `[llm] backend = "openai"` tests:
# PyPI `llama-cpp-python[server]` in a venv under $AVA_HOME, serving the test GGUF.
# PyPI has only its source distribution, so the wheel is built here once (CPU only, AVX2, no
# tools or multimodal parts; about ten minutes on two cores) and cached in $AVA_HOME/wheels;
# later runs only check. Idempotent. Registries only (PyPI).
set -euo pipefail

AVA_HOME="${AVA_HOME:-$HOME/.cache/asterisk-voice-agent}"
WHEELS="$AVA_HOME/wheels"
VENV="$AVA_HOME/openai-venv"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
PY="${PYTHON:-python3}"
mkdir -p "$WHEELS"

die() { echo "deps-openai: error: $*" >&2; exit 1; }
log() { echo "deps-openai: $*" >&2; }

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp.server, uvicorn, sse_starlette" 2>/dev/null; then
  exit 0
fi

WHL=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHL" ]; then
  log "building the llama-cpp-python $VERSION wheel from its PyPI source (cached in $WHEELS)"
  started=$(date +%s)
  tmp=$(mktemp -d "$WHEELS/.llama-cpp-python.XXXX")
  # Only the library: no examples, tests, tools, server binary, multimodal, OpenMP or curl.
  # Fixed CPU features (not -march=native) so the cached wheel runs on any AVX2 machine.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$PY" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VERSION" \
    || die "building llama-cpp-python $VERSION failed (needs cmake and a C++ compiler: scripts/install-deps.sh)"
  mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/
  rm -rf "$tmp"
  log "built in $(( $(date +%s) - started )) s"
  WHL=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || die "cannot create the venv $VENV"
log "installing $(basename "$WHL") with its server extras into $VENV"
"$VENV/bin/python" -m pip install --quiet "${WHL}[server]" \
  || die "pip install llama-cpp-python[server] failed (is the PyPI registry reachable?)"
"$VENV/bin/python" -c "import llama_cpp.server" || die "llama_cpp.server does not import"
log "ok: $VENV/bin/python -m llama_cpp.server"
