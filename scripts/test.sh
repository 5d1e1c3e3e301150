#!/usr/bin/env bash
# Set up what is missing (scripts/setup.sh, idempotent) and run the test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k budget -x
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$IMPATIENT_REPO/scripts/setup.sh"
cd "$IMPATIENT_REPO"
# Run from the repo root: the source modules are tested, and impatient_ros.msg
# resolves to the generated module installed in the venv (see impatient_ros/__init__.py).
#
# Two pytest-xdist workers by default (IMPATIENT_TEST_WORKERS, 0 = one process): most of
# the suite's time is node processes importing torch and builds, one core at a time, so
# two workers use both cores of a small machine. --dist loadfile keeps each test file in
# one worker (module fixtures, such as a shared node process, are built once), in the
# collection order tests/conftest.py gives (longest files first); each worker has a DDS
# domain of its own (tests/conftest.py). An -n given here wins.
workers="${IMPATIENT_TEST_WORKERS:-2}"
parallel=()
if [[ "$workers" != 0 ]]; then
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
exec "$IMPATIENT_VENV/bin/python" -m pytest "${parallel[@]}" "$@"
