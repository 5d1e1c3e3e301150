"""impatient_node's parameters: the schema it declares and the rule its on-set callback applies.

Apart from the node (and not in :mod:`impatient_ros.ros.params`, which the
tools import): the ``mode`` choices come from the engine's ``Mode`` enum, and
the engine module imports torch, which the tools must not pay for. The rules
here are pure, so tests check them without starting a node.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rclpy.parameter import Parameter

from impatient_ros.core.scheduler import POLICIES
from impatient_ros.ros.budget_policy import DEFAULT_MAX_STAMP_AGE_S, REFERENCE_TIMES, validate_energy_table
from impatient_ros.ros.cameras import camera_names_problem
from impatient_ros.ros.choices import RELIABILITIES, TRANSPORTS
from impatient_ros.ros.executors import EXECUTORS
from impatient_ros.ros.params import ParamSpec, check_values
from impatient_ros.ros.vision_messages import VISION_MSGS_CHOICES
from impatient_ros.runtime.engine import DEFAULT_ADMISSION_QUANTILE, Mode
from impatient_ros.runtime.realtime import MAX_PRIORITY

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MODES",
    "PARAMETERS",
    "check_parameters",
    "default_checkpoint_candidates",
]

DEFAULT_MODEL_NAME = "fashion_mnist_smallcnn.pt"
MODES: tuple[str, ...] = tuple(mode.value for mode in Mode)
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("checkpoint", "", "Checkpoint file (.pt) to run. Empty: the embedded Fashion-MNIST model "
              f"({DEFAULT_MODEL_NAME}) from share/impatient_ros/models or the source tree's models/.",
              read_only=True),
    ParamSpec("device", "auto", "Inference device: auto (CUDA if available), cpu, cuda or cuda:N.",
              read_only=True),
    ParamSpec("allow_cpu_fallback", True, "Run on the CPU (with a warning) when the CUDA device asked for "
              "does not exist; false makes configuration fail instead.", read_only=True),
    ParamSpec("fp16", False, "Half precision on CUDA (ignored on the CPU).", read_only=True),
    ParamSpec("cuda_graphs", True, "Capture one CUDA graph per stage (much lower launch overhead).",
              read_only=True),
    ParamSpec("use_ensemble", True, "When the checkpoint carries exit-ensemble weights, publish at exit k the "
              "ensemble of exits 1..k (StagePrediction.ensemble true); apriori then runs heads 1..k too and "
              "admits by their cost. false (or a checkpoint without weights): each exit's own answer.",
              read_only=True),
    ParamSpec("num_threads", 1, "torch CPU threads (torch.set_num_threads), set at configure before "
              "calibration. 1 by default: at batch 1 a stage gains little from more threads, and on a robot "
              "whose other processes want the cores too, extra threads make stage times (and so the "
              "admission quantile) jumpy. 0 = torch's default (OMP_NUM_THREADS, else one per core).",
              read_only=True, int_range=(0, 1024)),
    ParamSpec("calibration_file", "", "Timing calibration (JSON). If it exists and matches this network and "
              "device it is loaded instead of calibrating at configure; otherwise the node calibrates and "
              "writes it. Empty: always calibrate, write nothing.", read_only=True),
    ParamSpec("mode", "anytime", "anytime: publish every exit until the deadline; apriori: pick the deepest "
              "exit that fits the budget and run only it; cascade: like anytime but stop once an exit is "
              "confident (1-vs-2 ratio >= cascade_threshold).", choices=MODES),
    ParamSpec("default_budget_ms", 0.0, "Time per image when neither a fresh Budget message nor the energy "
              "table sets one, from the reference time. 0 = unlimited.", float_range=(0.0, 1e6)),
    ParamSpec("max_budget_ms", 10000.0, "Budgets above this (Budget messages, default_budget_ms) are "
              "rejected as absurd.", float_range=(0.001, 1e7)),
    ParamSpec("admission_quantile", DEFAULT_ADMISSION_QUANTILE, "A stage starts only if this quantile of its measured latency "
              "still fits before the deadline. Above 0.99 it is extrapolated from p90 and p99 (exponential "
              "tail: p99.9 = p99 + (p99 - p90)); 1.0 is the window's maximum.", float_range=(0.5, 1.0)),
    ParamSpec("cascade_threshold", 3.0, "cascade mode: stop when top-1 / top-2 probability >= this "
              "(1.0 stops at stage 1).", float_range=(1.0, 1e12)),
    ParamSpec("max_stage", 0, "Deepest exit to run (1..K); 0 = no cap. A Budget message's max_stage can "
              "cap further.", int_range=(0, 255)),
    ParamSpec("top_k", 5, "Number of class ids/scores in each message (clamped to the class count).",
              int_range=(1, 1000)),
    ParamSpec("input_transport", "raw", "raw: subscribe to sensor_msgs/Image on 'image'; compressed: to "
              "sensor_msgs/CompressedImage on 'image/compressed'.", read_only=True, choices=TRANSPORTS),
    ParamSpec("image_reliability", "best_effort", "Reliability of the camera subscription (history keep "
              "last 1). best_effort matches every publisher; reliable only reliable ones.", read_only=True,
              choices=RELIABILITIES),
    ParamSpec("reference_time", "arrival", "Deadlines count from the image header stamp (mapped onto the "
              "node's monotonic clock at arrival) or from the image's arrival.", choices=REFERENCE_TIMES),
    ParamSpec("max_stamp_age_s", DEFAULT_MAX_STAMP_AGE_S, "reference_time stamp: a stamp older than this at "
              "arrival is not trusted (clocks not synchronised, a replayed bag, a driver stamping with another "
              "clock); the deadline then counts from the arrival, counted as reference_fallback_stamp_too_old. "
              "A younger stamp is honoured and its age counts against the budget. 0 = trust every past stamp.",
              float_range=(0.0, 86400.0)),
    ParamSpec("budget_timeout_s", 2.0, "A Budget message applies for this long after its arrival; "
              "0 = until the next one.", float_range=(0.0, 86400.0)),
    ParamSpec("battery_timeout_s", 10.0, "A BatteryState reading applies for this long after its "
              "arrival; 0 = until the next one.", float_range=(0.0, 86400.0)),
    ParamSpec("energy_soc_levels", [0.2, 0.5, 1.0], "Energy table: state-of-charge levels (0..1, strictly "
              "increasing). A charge <= level i gets energy_budgets_ms[i]; above the last, the last entry."),
    ParamSpec("energy_budgets_ms", [5.0, 20.0, 0.0], "Energy table: budget per level in ms; 0 = no energy "
              "limit at that charge (default_budget_ms applies). Change both lists together with "
              "set_parameters_atomically when their length changes."),
    ParamSpec("labels", None, "Class names overriding the checkpoint's, one per class in class-id order. "
              "Unset: the checkpoint's names.", unset_type=Parameter.Type.STRING_ARRAY),
    ParamSpec("vision_msgs", "auto", "Also publish vision_msgs/Classification per exit (~/classification/stage_k, "
              "and ~/classification for every exit in order) and vision_msgs/LabelInfo (~/label_info, transient "
              "local). auto: when vision_msgs can be imported; required: it must be (configure fails "
              "otherwise); disabled: never.", read_only=True, choices=VISION_MSGS_CHOICES),
    ParamSpec("cameras", None, "Names of the cameras this node serves with one model and one inference "
              "thread. Unset or empty: one camera on image, budget, ~/stage_k, ~/prediction (as always). "
              "Names: camera <name> reads <name>/image (or <name>/image/compressed) and <name>/budget (else the "
              "node's budget topic, energy table and default apply) and publishes ~/<name>/stage_k, "
              "~/<name>/prediction (and ~/<name>/classification[/stage_k]); one diagnostics status per camera. "
              "Each name is a ROS name token, each once.", read_only=True, unset_type=Parameter.Type.STRING_ARRAY),
    ParamSpec("scheduler", "edf", "With cameras: which in-flight frame gets the next stage. edf: the earliest "
              "deadline whose next stage still fits (frames without a deadline use idle slots, and get a stage "
              "at least every scheduler_max_wait_ms); round_robin: the cameras in turn. Both end a frame whose "
              "next stage no longer fits with its last exit as final.", read_only=True, choices=POLICIES),
    ParamSpec("scheduler_max_wait_ms", 100.0, "With cameras and scheduler edf: a frame without a deadline that "
              "waited this long since its last stage gets the next one (no starvation).", read_only=True,
              float_range=(1.0, 60000.0)),
    ParamSpec("realtime_priority", 0, f"Linux SCHED_FIFO priority of the inference thread (1..{MAX_PRIORITY}; 0 = the "
              "normal scheduler). A real-time thread is not preempted by the machine's other (normal) tasks in "
              "the middle of a stage, which is where late answers on a busy machine come from. Needs "
              "CAP_SYS_NICE or an rtprio limit (ulimit -r); without it the node warns, keeps the normal "
              "scheduler and says so in diagnostics (inference_scheduling).", read_only=True,
              int_range=(0, MAX_PRIORITY)),
    ParamSpec("diagnostics_period_s", 1.0, "Period of the /diagnostics status.", float_range=(0.05, 60.0)),
    ParamSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed). "
              "false: wait in 'unconfigured' for lifecycle transitions.", read_only=True),
    ParamSpec("executor", "events", "Executor of the node's callbacks (images, budgets, battery, timers, "
              "lifecycle services) when run as impatient_node: events is rclpy's EventsExecutor (about 0.5 ms "
              "less from image arrival to inference start than single; falls back to single where rclpy "
              "lacks it), single the SingleThreadedExecutor.", read_only=True, choices=EXECUTORS),
)


def check_parameters(values: Mapping[str, Any], *, num_stages: int | None = None,
                     num_classes: int | None = None) -> str | None:
    """Why a complete set of parameter values is invalid, or None (pure; the on-set callback's rule).

    ``values`` holds every parameter (current values merged with the proposed
    change). ``num_stages``/``num_classes`` are known once a checkpoint is
    loaded; before that, the checks that need them are skipped (configure
    repeats them).
    """
    reason = check_values(PARAMETERS, values)
    if reason:
        return reason
    device = values.get("device")
    if device is not None and not _DEVICE_PATTERN.match(str(device)):
        return f"device must be auto, cpu, cuda or cuda:N; got {device!r}"
    default_ms, max_ms = values.get("default_budget_ms"), values.get("max_budget_ms")
    if default_ms is not None and max_ms is not None and default_ms > max_ms:
        return f"default_budget_ms ({default_ms}) exceeds max_budget_ms ({max_ms})"
    levels, budgets = values.get("energy_soc_levels"), values.get("energy_budgets_ms")
    if levels is not None and budgets is not None:
        reason = validate_energy_table(list(levels), list(budgets))
        if reason:
            return reason
        if max_ms is not None and any(b > max_ms for b in budgets):
            return f"energy_budgets_ms {list(budgets)} holds a budget above max_budget_ms ({max_ms})"
    max_stage = values.get("max_stage")
    if num_stages is not None and max_stage is not None and max_stage > num_stages:
        return f"max_stage {max_stage} exceeds the network's {num_stages} stages (0 = no cap)"
    reason = camera_names_problem(values.get("cameras"))
    if reason:
        return reason
    labels = values.get("labels")
    if num_classes is not None and labels and len(labels) != num_classes:
        return f"labels has {len(labels)} entries but the network has {num_classes} classes; give one per class"
    return None


def default_checkpoint_candidates() -> list[Path]:
    """Where the embedded model is looked for, in order: the ament share dir, the venv's share dir, models/."""
    candidates = []
    try:  # a colcon/ROS install registers the package in the ament index
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory("impatient_ros")) / "models" / DEFAULT_MODEL_NAME)
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (pip installs)
            pass
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "share" / "impatient_ros" / "models" / DEFAULT_MODEL_NAME)
    candidates.append(Path(__file__).resolve().parents[2] / "models" / DEFAULT_MODEL_NAME)
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique
