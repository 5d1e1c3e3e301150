#!/usr/bin/env bash
# The README's demo: an anytime classifier under a changing deadline, over real DDS on this host.
#
#   scripts/demo.sh
#
# Sets up the venv (scripts/setup.sh, idempotent), then runs four processes:
#   impatient-camera   Fashion-MNIST test images at DEMO_RATE_HZ, true labels on a side topic
#   impatient-budget   a budget sweep from tight to loose (DEMO_SCHEDULE), repeating
#   impatient_node     the classifier: one StagePrediction per exit, until the deadline
#   impatient-monitor  joins predictions with labels; live table here, summary + plot at the end
# for DEMO_SECONDS, stops them with SIGINT (camera first, monitor last) and prints the
# monitor's summary and where the plot is. No GPU, camera or network needed.
#
# Environment knobs:
#   DEMO_SECONDS     how long the camera runs              (default: 30)
#   DEMO_RATE_HZ     camera frame rate                     (default: 12.0)
#   DEMO_SCHEDULE    budget schedule, see impatient-budget (default: a 10 s sweep from below
#                    stage 1's time to above the whole network's, from the node's calibration)
#   DEMO_CHECKPOINT  model for the node                    (default: the node's embedded model)
#   DEMO_DEVICE      node device: cpu, auto, cuda          (default: cpu)
#   DEMO_OUT         output folder                         (default: runs/demo/<date-time>)
#   ROS_DOMAIN_ID    DDS domain                            (default: a random one in 1..101)
set -euo pipefail

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$IMPATIENT_REPO/scripts/setup.sh"

seconds="${DEMO_SECONDS:-30}"
rate_hz="${DEMO_RATE_HZ:-12.0}"
schedule="${DEMO_SCHEDULE:-}"
device="${DEMO_DEVICE:-cpu}"
out="${DEMO_OUT:-$IMPATIENT_REPO/runs/demo/$(date +%Y%m%d-%H%M%S)}"
bin="$IMPATIENT_VENV/bin"
# A domain of its own, so two demos (or a robot on the network) never cross-talk.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 101 + 1))}"
# Tensor math on one thread: the node classifies one small image at a time, and
# extra threads only compete with the other three processes for the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "$rate_hz" in *.*) ;; *) rate_hz="$rate_hz.0" ;; esac  # a ROS double parameter needs the dot
mkdir -p "$out"

log() { printf '[demo] %s\n' "$*" >&2; }

# The node measures its stages at start-up and writes them here; the default sweep is read from it.
calibration="$out/calibration.json"
node_args=(-p "device:=$device" -p "calibration_file:=$calibration")
if [ -n "${DEMO_CHECKPOINT:-}" ]; then
  node_args+=(-p "checkpoint:=$DEMO_CHECKPOINT")
fi

# Job control puts every background process in its own process group: a
# non-interactive shell would otherwise start them with SIGINT ignored, and
# the clean SIGINT shutdown below would not reach them.
set -m
declare -A pid
start() {  # start NAME COMMAND...: run it in the background, output to $out/NAME.log
  local name="$1"
  shift
  "$@" >"$out/$name.log" 2>&1 &
  pid[$name]=$!
}
alive() { [ -n "${pid[$1]:-}" ] && kill -0 "${pid[$1]}" 2>/dev/null; }
stop() {  # stop NAME: SIGINT, then SIGTERM after 10 s, then SIGKILL after 5 s more
  local name="$1" i
  alive "$name" || return 0
  kill -INT "${pid[$name]}" 2>/dev/null || true
  for i in $(seq 100); do alive "$name" || break; sleep 0.1; done
  if alive "$name"; then log "$name ignored SIGINT; sending SIGTERM"; kill -TERM "${pid[$name]}" 2>/dev/null || true; fi
  for i in $(seq 50); do alive "$name" || break; sleep 0.1; done
  if alive "$name"; then log "$name still running; killing it"; kill -KILL "${pid[$name]}" 2>/dev/null || true; fi
  wait "${pid[$name]}" 2>/dev/null || true
}
stop_all() {
  stop camera
  stop budget
  sleep 0.5  # the node finishes its last image, the monitor receives it
  stop node
  stop monitor
  # A bare wait also waits for the last process substitution: the tee of the monitor's table.
  wait 2>/dev/null || true
}
interrupted() { log "interrupted: stopping"; trap - INT TERM EXIT; stop_all; exit 130; }
trap interrupted INT TERM
trap 'stop_all' EXIT

log "output: $out (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
# The monitor's live table (stdout) is shown here and kept in monitor.out; its ROS log goes to monitor.log.
"$bin/impatient-monitor" --ros-args \
  -r prediction:=/impatient_node/prediction -r label:=/impatient_camera/label \
  -p summary_path:="$out/summary.json" -p plot_path:="$out/monitor.png" \
  > >(tee "$out/monitor.out") 2>"$out/monitor.log" &
pid[monitor]=$!
start node "$bin/impatient_node" --ros-args "${node_args[@]}"

log "waiting for impatient_node to load its model and time its stages"
for ((t = 0; t < 300; t++)); do
  [ -f "$calibration" ] && break
  if ! alive node; then
    log "impatient_node exited; the end of $out/node.log:"
    tail -n 20 "$out/node.log" >&2
    exit 1
  fi
  sleep 0.5
done
if [ -z "$schedule" ]; then
  [ -f "$calibration" ] || { log "no calibration from impatient_node after 150 s; see $out/node.log"; exit 1; }
  # Tight: stage 1's calibrated p99 (often no answer at all); loose: six times all
  # stages' p99 sum plus 8 ms. The calibration runs on an idle node; inside the demo
  # four processes share the CPU, a frame waits ~1 ms between arrival and start, and
  # the online timing model follows those slower real runs.
  schedule="$("$IMPATIENT_VENV/bin/python" - "$calibration" <<'CALIBRATION'
import json, sys

stages = json.load(open(sys.argv[1]))["stages"]
first, total = stages[0]["p99_ms"], sum(s["p99_ms"] for s in stages)
print(f"sweep:{first:.3g},{6 * total + 8:.3g},10")
CALIBRATION
)"
fi
start budget "$bin/impatient-budget" --ros-args -p schedule:="$schedule" -p rate_hz:=5.0 -p wait_for_subscribers:=1
# The camera holds its first frame until the node and the monitor are subscribed.
start camera "$bin/impatient-camera" --ros-args -p rate_hz:="$rate_hz" -p wait_for_subscribers:=1

log "running camera, budget ($schedule), impatient_node and monitor for ${seconds} s"
for ((t = 0; t < seconds; t++)); do
  for name in monitor node budget camera; do
    if ! alive "$name"; then
      log "$name exited early; the end of $out/$name.log:"
      tail -n 20 "$out/$name.log" >&2
      exit 1
    fi
  done
  sleep 1
done

log "stopping (SIGINT): camera, budget, node, monitor"
trap - EXIT
stop_all
trap - INT TERM

if [ ! -f "$out/summary.json" ]; then
  log "the monitor wrote no summary; see $out/monitor.log"
  exit 1
fi
log "summary: $out/summary.json"
"$IMPATIENT_VENV/bin/python" - "$out/summary.json" <<'EOF'
import json, sys

s = json.load(open(sys.argv[1]))
pct = lambda v: "-" if v is None else f"{v:.1%}"
f, fr = s["final"], s["frames"]
print(f"frames: {fr['labels_received']} sent, {fr['predicted']} answered, {fr['unanswered']} unanswered")
print(f"final answers: accuracy {pct(f['accuracy'])}, stages reached {f['stage_histogram']}, "
      f"stop reasons {f['stop_reasons']}, late {f['late']}")
for st in s["stages"]:
    lat = st["latency_ms"]
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.2f}"
    print(f"stage {st['stage']}: {st['count']} answers, accuracy {pct(st['accuracy'])}, latency p50 {p50} ms")
EOF
log "plot: $out/monitor.png"
log "logs: $out/{camera,budget,node,monitor}.log"
