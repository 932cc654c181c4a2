#!/usr/bin/env bash
# Issue 9's test tools, from Debian: a real Prometheus (scrapes /metrics in tests/admin.rs) and
# headless Chromium (loads the live page in tests/admin.rs). Idempotent: installs only what is
# missing. Needs root (apt-get) unless both are already installed.
set -euo pipefail

log() { echo "deps-admin: $*" >&2; }

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  log "ok: prometheus and chromium already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "missing ${missing[*]}: run as root, or: sudo apt-get install -y ${missing[*]}"
  exit 1
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system Prometheus on :9090; the tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
log "ok: $(prometheus --version 2>&1 | head -1); $(chromium --version 2>/dev/null || echo chromium)"
