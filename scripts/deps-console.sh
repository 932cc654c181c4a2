#!/usr/bin/env bash
# What `console` (cpal's ALSA backend) and its tests need, from Debian packages: the ALSA
# headers for building, alsa-utils, and a PulseAudio server with its ALSA plugin and client
# tools, which the tests run privately as a virtual sound device (null sinks for the
# microphone and the speaker). Idempotent: a second run only checks.
set -euo pipefail

die() { echo "deps-console: error: $*" >&2; exit 1; }

APT_PKGS=(libasound2-dev alsa-utils libasound2-plugins pulseaudio pulseaudio-utils)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "deps-console: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi
