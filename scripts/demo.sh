#!/usr/bin/env bash
# The main job, end to end: installs, builds, starts `serve` with the test models on a free
# loopback port, makes one simulated call with a real utterance and prints the JSON report
# and the conversation log.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$REPO/scripts/setup.sh"
cd "$REPO"
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$REPO/scripts/test-config.sh" "$PORT" "$WORK" > "$WORK/config.toml"
"$AVA_BIN" serve --config "$WORK/config.toml" 2> "$WORK/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
for _ in $(seq 1 120); do
  grep -q "AudioSocket server ready" "$WORK/serve.log" && break
  kill -0 $SERVE 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.5
done
echo "== simulated call (report)" >&2
"$AVA_BIN" simulate --server "127.0.0.1:$PORT" --wav "$AVA_AUDIO/book_appointment.8k.wav" \
  --record "$WORK/agent.wav" --json
echo "== conversation log ($WORK/conversations.jsonl)" >&2
sleep 0.5
cat "$WORK/conversations.jsonl" >&2
echo "== agent audio recorded to $WORK/agent.wav; service log in $WORK/serve.log" >&2
