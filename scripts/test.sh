#!/usr/bin/env bash
# Set up what is missing (scripts/setup.sh, idempotent) and run the test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k budget -x
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$IMPATIENT_REPO/scripts/setup.sh"
cd "$IMPATIENT_REPO"
# Run from the repo root: the source modules are tested, and impatient_ros.msg
# resolves to the generated module installed in the venv (see impatient_ros/__init__.py).
exec "$IMPATIENT_VENV/bin/python" -m pytest "$@"
