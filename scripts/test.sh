#!/usr/bin/env bash
# README's test command runs this file: the whole suite (unit, functional,
# integration against a real broker, Redis and Ray started by fixtures) and the
# doctests of every package.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests em3 stream learners serving simulators \
    --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py "$@"
