# Sourced by the scripts: where the project's venv lives.
# Outside the source tree on purpose: CMake refuses exported include paths
# (NumPy's, inside the venv) that lie inside the source directory.
IMPATIENT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMPATIENT_VENV="${IMPATIENT_VENV:-$HOME/.local/share/impatient_ros/venv}"
# Discovery stays on this host unless the user asks for more.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
