#!/usr/bin/env bash
# README's test command runs this file: the whole suite (unit, functional,
# integration against a real broker, Redis and Ray started by fixtures) and the
# doctests of every package.
#
#   bash scripts/test.sh          the full suite (what CI runs)
#   bash scripts/test.sh --fast   the fast lane: unit and functional tests and the
#                                 doctests, without slow (real encoders, long streams)
#                                 or integration (real services) tests, on two
#                                 pytest-xdist workers, and with
#                                 hypothesis' "fast" profile (10 examples where the
#                                 full suite runs 100; see tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    # One torch thread: the fast lane's models are tiny, and two threads spinning
    # for each other cost 2-6x on a machine other jobs share (measured on
    # tests/functional/test_closed_loop.py: 22 s against 7 s at load 4).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export EM3_HYPOTHESIS_PROFILE="${EM3_HYPOTHESIS_PROFILE:-fast}"
    # Two pytest-xdist workers (EM3_TEST_WORKERS=0 runs in this process): on 2 cores
    # the lane's ~10 s of imports and its tests split across both.
    exec python3 -m pytest -q tests/unit tests/functional em3 stream learners serving simulators \
        --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py \
        -m "not slow and not integration" -p no:cacheprovider -n "${EM3_TEST_WORKERS:-2}" "$@"
fi
exec python3 -m pytest -q tests em3 stream learners serving simulators \
    --doctest-modules --ignore=em3/__main__.py --ignore=stream/__main__.py "$@"
