#!/usr/bin/env bash
# Put promtool (Prometheus's rule and config checker) into DEST, from Debian's prometheus
# package: downloaded and unpacked, never installed, so no Prometheus service starts.
#   deploy/install-promtool.sh .venv/bin
set -euo pipefail
dest=$(realpath "${1:?usage: install-promtool.sh DEST_FOLDER}")
[[ -x "$dest/promtool" ]] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }
dpkg-deb -x prometheus_*.deb unpacked
install -m 0755 unpacked/usr/bin/promtool "$dest/promtool"
"$dest/promtool" --version | head -1
