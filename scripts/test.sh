#!/usr/bin/env bash
# README's test command runs this file: the whole suite, unit to integration.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q "$@"
