#!/usr/bin/env bash
# Render an A/B report page (report.html) to a PNG with headless Chromium.
#
#   bash scripts/report_screenshot.sh REPORT_HTML OUT_PNG [WIDTH [HEIGHT]]
#
# WIDTH x HEIGHT is the browser window (default 1280 x 900: the first screen of a
# laptop); the PNG shows what a reader sees before scrolling. Needs Debian's
# `chromium` (apt-get install -y chromium); set CHROMIUM to use another binary.
# Exits 3 when no Chromium is found.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT_HTML OUT_PNG [WIDTH [HEIGHT]]" >&2
    exit 2
fi
html="$(realpath "$1")"
png="$(realpath -m "$2")"
width="${3:-1280}"
height="${4:-900}"
[[ -f "$html" ]] || { echo "$0: no such file: $html" >&2; exit 2; }

browser="${CHROMIUM:-}"
if [[ -z "$browser" ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then browser="$candidate"; break; fi
    done
fi
[[ -n "$browser" ]] || { echo "$0: no chromium found (apt-get install -y chromium)" >&2; exit 3; }

mkdir -p "$(dirname "$png")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
rm -f "$png"
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is a local file.
"$browser" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
    --no-first-run --no-default-browser-check --disable-extensions --user-data-dir="$profile" \
    --force-device-scale-factor=1 --window-size="${width},${height}" \
    --screenshot="$png" "file://$html" >/dev/null 2>&1 || true
if [[ ! -s "$png" ]]; then
    echo "$0: chromium wrote no screenshot to $png" >&2
    exit 1
fi
echo "$png"
