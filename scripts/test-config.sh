#!/usr/bin/env bash
# Prints a serve config for the installed test models: test-config.sh PORT WORKDIR
set -euo pipefail
source "$(dirname "$0")/env.sh"
PORT="$1"; WORK="$2"
cat <<CFG
[server]
audiosocket_listen = "127.0.0.1:$PORT"

[agi]
listen = "127.0.0.1:$((PORT + 1))"

[models]
dir = "$AVA_MODELS"

[log]
conversation_log = "$WORK/conversations.jsonl"
CFG
