#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: torch/torchvision, the
# PyPI ROS 2 wheels, the message build and the Fashion-MNIST data package.
# Idempotent: a second run with nothing changed only checks a stamp (~1 s).
#
#   scripts/setup.sh
#
# Environment knobs:
#   IMPATIENT_VENV   where the venv lives            (default: ~/.local/share/impatient_ros/venv)
#   PYTHON           interpreter that creates it      (default: python3.11 or python3)
#   TORCH_SPEC       how torch/torchvision are asked  (default: the versions tested here)
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
repo="$IMPATIENT_REPO"
venv="$IMPATIENT_VENV"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
fmnist_dir="/usr/share/datasets/fashion-mnist"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Real data: Debian's dataset-fashion-mnist (skipped where apt is missing or we are not root).
if [ ! -d "$fmnist_dir" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || log "WARNING: could not install dataset-fashion-mnist; tests that need it will be skipped"
  else
    log "Fashion-MNIST not found in $fmnist_dir and apt is not usable; tests that need it will be skipped"
  fi
fi

# 2. The venv and its packages; a stamp of every input decides whether to redo work.
stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
deps_stamp="$(printf '%s\n' "$torch_spec" | cat - "$repo/pyproject.toml" "$repo/requirements/"*.txt | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv with $python"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_stamp" ]; then
  log "installing torch, ROS 2 wheels and tools (first run: a few minutes)"
  # shellcheck disable=SC2086
  "${pip[@]}" install $torch_spec
  "${pip[@]}" install -r "$repo/requirements/build.txt" -r "$repo/requirements/dev.txt"
  # The runtime dependencies declared in pyproject.toml (torch is already satisfied).
  mapfile -t runtime_deps < <("$venv/bin/python" -c "import tomllib, sys
print('\\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" "$repo/pyproject.toml")
  "${pip[@]}" install "${runtime_deps[@]}"
  echo "$deps_stamp" > "$venv/.deps-stamp"
fi

# 3. Build the messages and install the package (rebuilt when any source changed).
src_stamp="$(cd "$repo" && for path in CMakeLists.txt cmake package.xml pyproject.toml msg impatient_ros training bin launch config models; do
  if [ -e "$path" ]; then find "$path" -type f ! -path "*__pycache__*"; fi; done | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
if [ "$(cat "$venv/.src-stamp" 2>/dev/null)" != "$src_stamp" ]; then
  log "building messages and installing impatient_ros (~15 s)"
  (cd "$repo" && "${pip[@]}" install --no-build-isolation --no-deps .)
  echo "$src_stamp" > "$venv/.src-stamp"
fi
log "ready: $venv"
