#!/usr/bin/env bash
# README's test command runs this file: the whole suite (unit, functional,
# integration against a real broker, Redis and Ray started by fixtures) and the
# doctests of every package.
#
#   bash scripts/test.sh          the full suite (what CI runs)
#   bash scripts/test.sh --fast   the fast lane: unit and functional tests and the
#                                 doctests, without slow (real encoders, long streams)
#                                 or integration (real services) tests, and with
#                                 hypothesis' "fast" profile (10 examples where the
#                                 full suite runs 100; see tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    export EM3_HYPOTHESIS_PROFILE="${EM3_HYPOTHESIS_PROFILE:-fast}"
    exec python3 -m pytest -q tests/unit tests/functional em3 stream learners serving simulators \
        --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py \
        -m "not slow and not integration" -p no:cacheprovider "$@"
fi
exec python3 -m pytest -q tests em3 stream learners serving simulators \
    --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py "$@"
