#!/usr/bin/env bash
# README's test command runs this file: the whole suite (unit, functional,
# integration against a real broker, Redis and Ray started by fixtures) and the
# doctests of every package.
#
#   bash scripts/test.sh          the full suite (what CI runs)
#   bash scripts/test.sh --fast   the fast lane: unit and functional tests and the
#                                 doctests, without slow (real encoders, long streams)
#                                 or integration (real services) tests
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    exec python3 -m pytest -q tests/unit tests/functional em3 stream learners serving simulators \
        --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py \
        -m "not slow and not integration" -p no:cacheprovider "$@"
fi
exec python3 -m pytest -q tests em3 stream learners serving simulators \
    --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py "$@"
