#!/usr/bin/env bash
# Reproduce the paper's Table 1 / Table 2 / Fig. 6 on this machine and write the report to bench/results/.
#   bench/reproduce_paper.sh                 # full plan: 3 seeds, small CNN + EfficientNet-Lite0 (about 90 min
#                                            # on 2 idle cores; much longer on a shared machine)
#   bench/reproduce_paper.sh --quick         # end-to-end check in minutes (numbers meaningless)
#   bench/reproduce_paper.sh --investigate   # recipe variants on ILIN/IPOLY, one seed
# Any other options go to bench/reproduce_paper.py (see --help). The Python comes from $PYTHON, else the
# project venv, else python3 on PATH. The console log is kept next to the report.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$HOME/.local/share/impatient_ros/venv/bin/python" ]]; then
  PY="$HOME/.local/share/impatient_ros/venv/bin/python"
else
  PY=python3
fi
mkdir -p bench/results
# The log is named after the kind of run (full, _quick, _partial when seeds/regimes/... are given, investigation).
quick="" partial="" name=""
for arg in "$@"; do
  case "$arg" in
    --quick) quick=_quick ;;
    --seeds|--regimes|--epochs) partial=_partial ;;
    --investigate) name=investigation ;;
  esac
done
name="${name:-paper_reproduction${quick}${partial}}"
# One OpenMP pool per process; the script sets torch's thread count itself (--threads).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$PY" bench/reproduce_paper.py "$@" 2>&1 | tee "bench/results/${name}.log"
