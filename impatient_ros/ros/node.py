"""The ROS 2 node ``impatient_node``: camera images in, one StagePrediction per exit out, under a deadline.

A thin adapter: image decoding (:mod:`impatient_ros.ros.image_convert`), the budget
policy (:mod:`impatient_ros.ros.budget_policy`), staged inference
(:mod:`impatient_ros.runtime.engine`), message filling (:mod:`impatient_ros.ros.messages`)
and statistics (:mod:`impatient_ros.ros.diagnostics`) are pure modules, as are the
parameter schema (:mod:`impatient_ros.ros.node_params`), the frame mailbox
(:mod:`impatient_ros.ros.mailbox`) and the log throttle
(:mod:`impatient_ros.ros.log_throttle`); executor selection is
:mod:`impatient_ros.ros.executors`. This file wires them to topics, parameters
and the lifecycle.

Topics (relative names, so ``-r __ns:=`` and remaps apply)::

    in   image                sensor_msgs/Image            (input_transport: raw)
    in   image/compressed     sensor_msgs/CompressedImage  (input_transport: compressed; follows a
                                                            remap of ``image`` like image_transport)
    in   budget               impatient_ros/Budget
    in   battery_state        sensor_msgs/BatteryState
    out  ~/stage_1 .. ~/stage_K  impatient_ros/StagePrediction (one message per image and exit)
    out  ~/prediction            impatient_ros/StagePrediction (every stage's message, in order)
    out  ~/classification/stage_1 .. stage_K  vision_msgs/Classification (vision_msgs required, or auto
                                 and importable: the same answer as ~/stage_k, header = the image's)
    out  ~/classification        vision_msgs/Classification (every stage's, in order; no repeats:
                                 Classification has no is_final to tell a repeat apart)
    out  ~/label_info            vision_msgs/LabelInfo (transient local: class id -> name, again
                                 when ``labels`` changes)
    out  /diagnostics            diagnostic_msgs/DiagnosticArray (every diagnostics_period_s)

Several cameras (``cameras`` parameter, e.g. ``[front, rear]``; unset or empty:
the single camera above). Camera ``<name>`` has ``<name>/image`` (or
``<name>/image/compressed``) and ``<name>/budget`` in (its Budget applies to it
alone; without a fresh one the node's ``budget``, energy table and default
apply), ``~/<name>/stage_k``, ``~/<name>/prediction`` (and
``~/<name>/classification[/stage_k]``) out, and one /diagnostics status of its
own. One model, one engine, one inference thread: each camera has a
newest-frame mailbox; before every stage the mailboxes of cameras without a
frame in flight hand over their frames (each starts a resumable run,
``StagedEngine.start_run``) and :class:`impatient_ros.core.scheduler.StageScheduler`
gives the stage to the frame with the earliest deadline whose next stage still
fits (``scheduler: edf``; its module states the rule for frames without a
deadline) or to the cameras in turn (``round_robin``). A frame whose next stage
no longer fits ends with its last exit as final, as in the single-camera node.

Threads: the executor thread runs subscription, parameter, lifecycle and timer
callbacks; a dedicated inference thread takes the newest image from a
single-slot mailbox and runs the engine, publishing each exit's message from
its ``on_result`` callback the moment the exit is ready. So budget and battery
updates are never queued behind a running stage, and an image that arrives
while another waits replaces it (counted as dropped): the node always works on
the newest frame. With ``realtime_priority`` the inference thread runs under
Linux SCHED_FIFO (:mod:`impatient_ros.runtime.realtime`), so the machine's
other tasks cannot take its core in the middle of a stage; the executor
thread keeps the normal scheduler.

Lifecycle (``rclpy.lifecycle``): parameters are declared in the constructor;
*configure* loads the checkpoint, builds the engine and calibrates it (or loads
``calibration_file``) and creates the publishers; *activate* creates the
subscriptions and starts the inference thread; *deactivate* stops both;
*cleanup* releases the engine (and GPU memory). With ``autostart`` (default
true, since pip installs have no lifecycle manager) the node configures and
activates itself at start-up and exits with status 1 if that fails.

Deadlines (see :mod:`impatient_ros.ros.budget_policy`): deadline = reference time
+ effective budget, on ``time.monotonic()``. The image callback reads the
node's ROS clock and the monotonic clock together at arrival; with
``reference_time: stamp`` the header stamp is shifted by their difference onto
the monotonic clock, so the image's age at arrival counts against its budget;
a stamp older than ``max_stamp_age_s`` or in the future is not trusted (the
arrival time is used, counted as ``reference_fallback_*``). "Arrival" is when
the image callback runs, after the transport and the executor: whatever the
mode, /diagnostics reports how old the stamps were then (``image_stamp_age_*``),
the time that ``arrival`` does not charge to the budget. The budget is
looked up when inference of the image starts, so a new Budget message applies
to the next image processed.

Each image gets exactly one message with ``is_final`` true on ``~/prediction``:
the engine guarantees it (see StagedEngine). When it handed over an exit as not
final and then found no time for the next one, or a later stage failed, it hands
over a ``repeated`` copy of that exit marked final (stop reason DEADLINE or
ERROR); the node publishes such a repeat on ``~/prediction`` only, never on a
stage topic, and counts it (``final_announcements_repaired``). An image for which
not even stage 1 fits the budget (NO_TIME) publishes nothing; it is counted and
logged (throttled).
"""

from __future__ import annotations

import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sensor_msgs.msg import BatteryState, CompressedImage, Image

from impatient_ros.msg import Budget, StagePrediction
from impatient_ros.core.scheduler import StageScheduler
from impatient_ros.ros.budget_policy import BudgetPolicy, BudgetPolicyConfig, combine_stage_caps, reference_time
from impatient_ros.ros.cameras import camera_budget, camera_input, camera_output
from impatient_ros.ros.diagnostics import ERROR, NodeStats, StatsSnapshot, build_report
from impatient_ros.ros.executors import make_executor, spin
from impatient_ros.ros.image_convert import ImageConversionError, compressed_to_array, image_to_array
from impatient_ros.ros.log_throttle import LogThrottle
from impatient_ros.ros.mailbox import LatestFrameMailbox
from impatient_ros.ros.messages import (
    MAX_FRAME_ID_BYTES,
    build_stage_prediction,
    header_problem,
    resolve_labels,
    stage_accuracy,
)
from impatient_ros.ros.node_params import PARAMETERS, check_parameters, default_checkpoint_candidates
from impatient_ros.ros.params import declare
from impatient_ros.ros.topics import compressed_topic
from impatient_ros.ros.vision_messages import build_classification, build_label_info, load_vision_msgs
from impatient_ros.runtime.checkpoint import CheckpointError, load_checkpoint
from impatient_ros.runtime.engine import StagedEngine
from impatient_ros.runtime.realtime import ThreadScheduling, use_realtime_priority
from impatient_ros.runtime.timing import TimingError

__all__ = ["NODE_NAME", "ImpatientNode", "main"]

NODE_NAME = "impatient_node"
_THROTTLE_S = 5.0
_PARAMETER_NAMES = frozenset(spec.name for spec in PARAMETERS)


@dataclass(frozen=True)
class _Frame:
    msg: Any            # sensor_msgs/Image or CompressedImage
    arrival: float      # time.monotonic() at the callback
    ros_now_s: float    # the node's ROS clock at the same moment (maps stamps onto monotonic time)
    stamp_s: float      # the header stamp in seconds (0 = unset)


@dataclass(eq=False)
class _Camera:
    """One camera's inputs, outputs and statistics (the unnamed one is the single-camera node's own)."""

    name: str                    # "" = the single camera of a node without ``cameras``
    mailbox: LatestFrameMailbox
    stats: NodeStats
    policy: BudgetPolicy | None  # its own <name>/budget topic (None: only the node's policy)
    stage_pubs: list[Any] = field(default_factory=list)
    prediction_pub: Any = None
    classification_stage_pubs: list[Any] = field(default_factory=list)
    classification_pub: Any = None
    last_snapshot: StatsSnapshot | None = None
    job: _Job | None = None      # the frame in flight (multi-camera scheduler)


@dataclass(eq=False)
class _Job:
    """One frame between decoding and its last answer: what publishing and the statistics need."""

    camera: _Camera
    image: Any                   # the decoded image (image_convert result)
    ref: Any                     # budget_policy.ReferenceTime
    budget: Any                  # budget_policy.EffectiveBudget
    deadline: float | None
    cap: int
    publish: Any                 # on_result callback
    published_at: list[float]


@dataclass(frozen=True)
class _Settings:
    """Run-time parameters the inference thread reads once per image (replaced atomically)."""

    mode: str
    max_stage: int
    cascade_threshold: float
    admission_quantile: float
    top_k: int
    reference_time: str
    max_stamp_age_s: float
    labels: tuple[str, ...] | None


def _duration_s(duration: Any) -> float:
    return float(duration.sec) + float(duration.nanosec) * 1e-9


# --------------------------------------------------------------------------- the node


class ImpatientNode(LifecycleNode):
    """Deadline-aware staged classification of camera images (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        declare(self, PARAMETERS)
        # Overrides (-p, --params-file) were applied by the declarations: validate them as a whole.
        reason = check_parameters(self._parameter_values())
        if reason:
            raise ParameterException(f"invalid parameters: {reason}", [])
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._stats = NodeStats()
        self._policy = BudgetPolicy(self._policy_config())
        self._settings = self._read_settings()
        self._mailbox = LatestFrameMailbox()
        # The single camera's mailbox, statistics and publishers are the node's own (as before cameras).
        self._single = _Camera("", self._mailbox, self._stats, None)
        self._cameras = [_Camera(name, LatestFrameMailbox(), NodeStats(), BudgetPolicy(self._policy_config()))
                         for name in (self._param_or("cameras") or [])]
        self._wake = threading.Event()  # set by every camera's image callback: the scheduler has work
        self._scheduler: StageScheduler | None = None
        self._log_throttle = LogThrottle(_THROTTLE_S)
        self._engine: StagedEngine | None = None
        self._labels: list[str] = []
        self._stage_pubs: list[Any] = []
        self._prediction_pub: Any = None
        self._vision: Any = None  # the vision_msgs.msg module while configured with vision_msgs output
        self._classification_stage_pubs: list[Any] = []
        self._classification_pub: Any = None
        self._label_info_pub: Any = None
        self._subscriptions: list[Any] = []
        self._worker: threading.Thread | None = None
        self._scheduling: ThreadScheduling | None = None  # the inference thread's, once it started
        self._stop = threading.Event()
        self._seq = 0
        self._predicted_ms: tuple[float, ...] = ()  # per stage, at the admission quantile
        self._median_ms: tuple[float, ...] = ()
        self._state = "unconfigured"
        self._error = ""
        self._last_snapshot: StatsSnapshot | None = None
        # Diagnostics run in every lifecycle state, so a failed configure is visible too.
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self._param("diagnostics_period_s"), self._publish_diagnostics)

    # ------------------------------------------------------------------ parameters
    @property
    def autostart(self) -> bool:
        """Whether main() configures and activates the node at start-up."""
        return bool(self._param("autostart"))

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _param_or(self, name: str) -> Any:
        return self.get_parameter_or(name).value  # None while unset

    def _parameter_values(self) -> dict[str, Any]:
        values = {}
        for spec in PARAMETERS:
            values[spec.name] = self.get_parameter_or(spec.name).value  # None while unset (labels)
        return values

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        proposed = self._parameter_values()
        for param in params:
            if param.name in _PARAMETER_NAMES and param.type_ == Parameter.Type.NOT_SET:
                return SetParametersResult(successful=False, reason=f"{param.name} cannot be undeclared")
            proposed[param.name] = param.value
        engine = self._engine
        reason = check_parameters(
            proposed,
            num_stages=engine.num_stages if engine is not None else None,
            num_classes=engine.num_classes if engine is not None else None,
        )
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        self._policy.configure(self._policy_config())
        for camera in self._cameras:
            camera.policy.configure(self._policy_config())
        self._settings = self._read_settings()
        if "labels" in names and self._engine is not None:
            self._labels = self._resolve_labels(self._engine)
            self._publish_label_info()
        if "diagnostics_period_s" in names:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = self.create_timer(self._param("diagnostics_period_s"), self._publish_diagnostics)

    def _policy_config(self) -> BudgetPolicyConfig:
        return BudgetPolicyConfig(
            default_budget_s=self._param("default_budget_ms") / 1e3,
            budget_timeout_s=self._param("budget_timeout_s"),
            battery_timeout_s=self._param("battery_timeout_s"),
            energy_soc_levels=tuple(self._param("energy_soc_levels")),
            energy_budgets_s=tuple(b / 1e3 for b in self._param("energy_budgets_ms")),
            max_budget_s=self._param("max_budget_ms") / 1e3,
        )

    def _read_settings(self) -> _Settings:
        labels = self._parameter_values()["labels"]
        return _Settings(
            mode=self._param("mode"),
            max_stage=int(self._param("max_stage")),
            cascade_threshold=float(self._param("cascade_threshold")),
            admission_quantile=float(self._param("admission_quantile")),
            top_k=int(self._param("top_k")),
            reference_time=self._param("reference_time"),
            max_stamp_age_s=float(self._param("max_stamp_age_s")),
            labels=tuple(labels) if labels else None,
        )

    def _resolve_labels(self, engine: StagedEngine) -> list[str]:
        return resolve_labels(engine.class_names, self._settings.labels, engine.num_classes)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the checkpoint, build and calibrate the engine, create the publishers."""
        try:
            self._configure()
        except Exception as exc:  # rclpy would swallow it: report why configuration failed
            self._error = f"configure failed: {exc}"
            self.get_logger().error(self._error)
            self._release()
            return TransitionCallbackReturn.FAILURE
        self._state, self._error = "inactive", ""
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        # First: vision_msgs:=required without the package fails before the slow steps.
        vision = load_vision_msgs(self._param("vision_msgs"))
        threads = int(self._param("num_threads"))
        if threads > 0:  # before the engine's warm-up and calibration measure anything
            torch.set_num_threads(threads)
        path = self._checkpoint_path()
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as exc:
            raise RuntimeError(f"cannot load checkpoint: {exc}") from exc
        # The engine warns through Python's warnings module (CUDA absent -> CPU, fp16 ignored, graph
        # capture failed), which bypasses the ROS log (/rosout, log files): hand them on to the logger.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = StagedEngine(
                checkpoint, self._param("device"),
                admission_quantile=self._settings.admission_quantile,
                top_k=self._settings.top_k,
                fp16=self._param("fp16"),
                cuda_graphs=self._param("cuda_graphs"),
                allow_cpu_fallback=self._param("allow_cpu_fallback"),
                use_ensemble=self._param("use_ensemble"),
            )
        for warning in caught:
            self.get_logger().warning(str(warning.message))
        reason = check_parameters(self._parameter_values(), num_stages=engine.num_stages,
                                  num_classes=engine.num_classes)
        if reason:
            raise RuntimeError(f"parameters do not fit checkpoint {path}: {reason}")
        self._calibrate(engine)
        self._engine = engine
        self._labels = self._resolve_labels(engine)
        self._update_predictions(engine)
        results_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for camera in self._cameras or [self._single]:
            camera.stage_pubs = [self.create_publisher(StagePrediction, camera_output(camera.name, f"stage_{k}"),
                                                       results_qos) for k in range(1, engine.num_stages + 1)]
            camera.prediction_pub = self.create_publisher(StagePrediction, camera_output(camera.name, "prediction"),
                                                          results_qos)
        self._stage_pubs, self._prediction_pub = self._single.stage_pubs, self._single.prediction_pub
        if vision is not None:
            self._create_vision_publishers(vision, engine.num_stages, results_qos)
        self.get_logger().info(
            f"configured: {path} ({engine.num_stages} stages, {engine.num_classes} classes) on "
            f"{engine.device_label} ({torch.get_num_threads()} torch thread(s)), vision_msgs output "
            f"{'on' if vision is not None else 'off'}, exit ensemble {'on' if engine.use_ensemble else 'off'}; "
            f"stage cost p{100 * engine.admission_quantile:g} [ms]: "
            + ", ".join(f"{ms:.2f}" for ms in self._predicted_ms))

    def _create_vision_publishers(self, vision: Any, num_stages: int, results_qos: QoSProfile) -> None:
        self._vision = vision
        for camera in self._cameras or [self._single]:
            camera.classification_stage_pubs = [
                self.create_publisher(vision.Classification, camera_output(camera.name, f"classification/stage_{k}"),
                                      results_qos) for k in range(1, num_stages + 1)]
            camera.classification_pub = self.create_publisher(
                vision.Classification, camera_output(camera.name, "classification"), results_qos)
        self._classification_stage_pubs = self._single.classification_stage_pubs
        self._classification_pub = self._single.classification_pub
        # Transient local: a subscriber that joins later still gets the class map (like a latched topic).
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._label_info_pub = self.create_publisher(vision.LabelInfo, "~/label_info", latched)
        self._publish_label_info()

    def _publish_label_info(self) -> None:
        vision, pub = self._vision, self._label_info_pub
        if vision is None or pub is None:
            return
        msg = build_label_info(vision.LabelInfo, self._labels, vision_class=vision.VisionClass)
        msg.header.stamp = self.get_clock().now().to_msg()
        pub.publish(msg)

    def _checkpoint_path(self) -> Path:
        configured = str(self._param("checkpoint")).strip()
        if configured:
            return Path(configured).expanduser()
        candidates = default_checkpoint_candidates()
        for path in candidates:
            if path.is_file():
                return path
        raise RuntimeError("no checkpoint parameter given and the embedded model was not found in "
                           + ", ".join(str(p) for p in candidates)
                           + "; set -p checkpoint:=/path/to/model.pt (train one with impatient-train)")

    def _calibrate(self, engine: StagedEngine) -> None:
        calibration = str(self._param("calibration_file")).strip()
        if calibration and Path(calibration).expanduser().is_file():
            try:
                engine.load_calibration(Path(calibration).expanduser())
                self.get_logger().info(f"timing calibration loaded from {calibration}")
                return
            except TimingError as exc:
                self.get_logger().warning(f"{exc}; calibrating again")
        engine.calibrate()
        rounds = engine.last_calibration
        if rounds is not None and not rounds.stable:
            # Admission then starts from pessimistic figures; the online update ages them out.
            self.get_logger().warning(
                f"timing calibration did not settle ({rounds.rounds} rounds in {rounds.seconds:.1f} s: the machine "
                "is busy); stage costs will follow the measured ones as frames run")
        if calibration:
            saved = engine.save_calibration(Path(calibration).expanduser())
            self.get_logger().info(f"timing calibration written to {saved}")

    def _update_predictions(self, engine: StagedEngine) -> None:
        # The timing model is not thread-safe: only the thread that runs the engine reads it.
        if engine.timing.is_calibrated:
            q, timing = engine.admission_quantile, engine.timing
            self._predicted_ms = tuple(1e3 * (timing.predict_anytime_completion(k, q) + engine.overhead_s)
                                       for k in range(engine.num_stages))
            self._median_ms = tuple(1e3 * (timing.stage_cost(k, 0.5) + engine.overhead_s)
                                    for k in range(engine.num_stages))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to images, budget and battery and start the inference thread."""
        try:
            self._activate()
        except Exception as exc:
            self._error = f"activate failed: {exc}"
            self.get_logger().error(self._error)
            self._deactivate()
            return TransitionCallbackReturn.FAILURE
        self._state, self._error = "active", ""
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        transport = self._param("input_transport")
        reliability = (ReliabilityPolicy.RELIABLE if self._param("image_reliability") == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        image_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=reliability)
        budget_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        camera_subs = []
        for camera in self._cameras or [self._single]:
            image_topic = camera_input(camera.name, "image")
            on_image = (lambda msg, camera=camera: self._on_image(msg, camera)) if camera.name else self._on_image
            if transport == "compressed":
                camera_subs.append(self.create_subscription(
                    CompressedImage, compressed_topic(self.resolve_topic_name, image_topic), on_image, image_qos))
            else:
                camera_subs.append(self.create_subscription(Image, image_topic, on_image, image_qos))
            if camera.name:
                camera_subs.append(self.create_subscription(
                    Budget, camera_input(camera.name, "budget"),
                    lambda msg, camera=camera: self._on_budget(msg, camera), budget_qos))
        image_sub = camera_subs[0]
        budget_sub = self.create_subscription(Budget, "budget", self._on_budget, budget_qos)
        # Best effort matches reliable and best-effort battery publishers alike; only the newest reading matters.
        battery_sub = self.create_subscription(
            BatteryState, "battery_state", self._on_battery,
            QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))
        self._subscriptions = [*camera_subs, budget_sub, battery_sub]
        self._stop = threading.Event()
        loop = self._multi_worker_loop if self._cameras else self._worker_loop
        self._worker = threading.Thread(target=self._inference_thread, args=(loop, self._stop),
                                        name="impatient_inference", daemon=True)
        self._worker.start()
        if self._cameras:
            self.get_logger().info(
                f"active: {len(self._cameras)} cameras ({transport}), scheduler {self._param('scheduler')}: "
                + "; ".join(f"{c.name}: {c.prediction_pub.topic_name}" for c in self._cameras))
        else:
            self.get_logger().info(f"active: images on {image_sub.topic_name} ({transport}), "
                                   f"results on {self._prediction_pub.topic_name}")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the inference thread and drop the subscriptions."""
        self._deactivate()
        self._state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def _deactivate(self) -> None:
        self._stop.set()
        self._mailbox.wake()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().error("the inference thread did not stop within 30 s")
            self._worker = None
        for sub in self._subscriptions:
            self.destroy_subscription(sub)
        self._subscriptions = []
        for camera in [self._single, *self._cameras]:
            discarded = camera.mailbox.clear()
            if discarded:
                camera.stats.frame_dropped(discarded)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the engine (and its GPU memory) and the publishers; zero the statistics."""
        self._release()
        self._stats.reset()
        self._last_snapshot = None
        for camera in self._cameras:
            camera.stats.reset()
            camera.last_snapshot = None
        self._state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop everything."""
        self.release_all()
        self._state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def release_all(self) -> None:
        """Stop the inference thread, drop subscriptions, publishers and the engine (idempotent)."""
        self._deactivate()
        self._release()

    def _release(self) -> None:
        for camera in [self._single, *self._cameras]:
            for pub in [*camera.stage_pubs, camera.prediction_pub, *camera.classification_stage_pubs,
                        camera.classification_pub]:
                if pub is not None:
                    self.destroy_publisher(pub)
            camera.stage_pubs, camera.prediction_pub = [], None
            camera.classification_stage_pubs, camera.classification_pub = [], None
        if self._label_info_pub is not None:
            self.destroy_publisher(self._label_info_pub)
        self._stage_pubs, self._prediction_pub = [], None
        self._vision, self._classification_stage_pubs = None, []
        self._classification_pub = self._label_info_pub = None
        engine, self._engine = self._engine, None
        self._predicted_ms, self._median_ms = (), ()
        if engine is not None:
            on_cuda = engine.device.type == "cuda"
            del engine
            if on_cuda:
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_image(self, msg: Any, camera: _Camera | None = None) -> None:
        arrival = time.monotonic()
        ros_now_s = self.get_clock().now().nanoseconds * 1e-9
        camera = camera or self._single
        camera.stats.frame_received()
        # Here, not in the inference thread: a lying header never displaces a good frame in the mailbox.
        problem = header_problem(msg.header)
        if problem:
            camera.stats.frame_rejected(problem)
            if self._log_throttle.ready("header_rejected"):
                self.get_logger().warning(
                    f"image rejected ({problem}): header.frame_id has {len(msg.header.frame_id)} characters, "
                    f"at most {MAX_FRAME_ID_BYTES} bytes are copied into the outputs")
            return
        stamp_s = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        if stamp_s > 0.0:  # unset stamps (0) say nothing about the delay
            camera.stats.stamp_age(ros_now_s - stamp_s)
        if camera.mailbox.put(_Frame(msg, arrival, ros_now_s, stamp_s)):
            camera.stats.frame_dropped()
        self._wake.set()

    def _on_budget(self, msg: Any, camera: _Camera | None = None) -> None:
        policy = self._policy if camera is None else camera.policy
        reason = policy.on_budget(_duration_s(msg.budget), msg.max_stage, msg.source, time.monotonic())
        if reason and self._log_throttle.ready("budget_rejected"):
            where = "" if camera is None else f" on camera {camera.name}'s topic"
            self.get_logger().warning(
                f"Budget rejected ({reason}){where}: {msg.budget.sec} s + {msg.budget.nanosec} ns from "
                f"'{msg.source}'; budgets must lie in 0..max_budget_ms={self._param('max_budget_ms')} ms")

    def _on_battery(self, msg: Any) -> None:
        reason = self._policy.on_battery(float(msg.percentage), time.monotonic())
        if reason and self._log_throttle.ready("battery_rejected"):
            self.get_logger().warning(
                f"BatteryState rejected ({reason}): percentage {msg.percentage}; expected 0..1")

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        engine = self._engine
        extra = [("state", self._state), ("mode", self._settings.mode),
                 ("reference_time", self._settings.reference_time)]
        if engine is not None:
            extra += [("device", engine.device_label), ("num_stages", str(engine.num_stages)),
                      ("torch_threads", str(torch.get_num_threads())),
                      ("inference_scheduling", self._scheduling.description if self._scheduling else "not started"),
                      ("vision_msgs", "publishing" if self._vision is not None else "off")]
            extra += [(f"stage_{k}_predicted_ms", f"{ms:.3f}") for k, ms in enumerate(self._predicted_ms, 1)]
            extra += [(f"stage_{k}_median_ms", f"{ms:.3f}") for k, ms in enumerate(self._median_ms, 1)]
        soc = self._policy.battery_soc(now)
        extra.append(("battery_soc", "n/a" if soc is None else f"{soc:.3f}"))
        if self._error:
            extra.append(("error", self._error))
        statuses = []
        if not self._cameras:
            snap = self._stats.snapshot()
            statuses.append(self._diagnostic_status(
                "staged inference", snap, self._last_snapshot, self._policy.effective(now),
                self._policy.rejections(), extra))
            self._last_snapshot = snap
        scheduler = self._scheduler
        for camera in self._cameras:  # one status per camera: its own counters, budget and hit rate
            snap = camera.stats.snapshot()
            shared, own = self._policy.rejections(), camera.policy.rejections()
            sched = scheduler.stats.get(camera.name) if scheduler is not None else None
            camera_extra = [("camera", camera.name), ("scheduler", self._param("scheduler")),
                            ("scheduler_expired", str(sched.expired if sched else 0)),
                            ("scheduler_aged_stages", str(sched.aged if sched else 0)), *extra]
            statuses.append(self._diagnostic_status(
                f"staged inference {camera.name}", snap, camera.last_snapshot,
                camera_budget(camera.policy.effective(now), self._policy.effective(now)),
                {reason: shared[reason] + own[reason] for reason in shared}, camera_extra))
            camera.last_snapshot = snap
        array = DiagnosticArray(status=statuses)
        array.header.stamp = self.get_clock().now().to_msg()
        try:
            self._diag_pub.publish(array)
        except Exception as exc:  # noqa: BLE001 - shutdown races must not kill the executor
            self.get_logger().debug(f"diagnostics not published: {exc}")

    def _diagnostic_status(self, title: str, snap: StatsSnapshot, previous: StatsSnapshot | None, budget: Any,
                           rejections: dict[str, int], extra: list[tuple[str, str]]) -> DiagnosticStatus:
        engine = self._engine
        report = build_report(
            snap, previous, active=self._state == "active", budget_ms=budget.budget_ms,
            budget_source=budget.source, budget_detail=budget.detail, input_rejections=rejections, extra=extra,
            num_stages=engine.num_stages if engine is not None else 0)
        return DiagnosticStatus(
            level=(ERROR if self._error else report.level).to_bytes(1, "little"),
            name=f"{self.get_fully_qualified_name()}: {title}",
            message=self._error or report.message,
            hardware_id=engine.device_label if engine is not None else "",
            values=[KeyValue(key=k, value=v) for k, v in report.values],
        )

    # ------------------------------------------------------------------ inference thread
    def _inference_thread(self, loop: Callable[[threading.Event], None], stop: threading.Event) -> None:
        """The inference thread: its scheduling first (realtime_priority, runtime.realtime), then ``loop``."""
        priority = self._param("realtime_priority")
        scheduling = use_realtime_priority(priority)
        self._scheduling = scheduling
        if scheduling.error:
            self.get_logger().warning(f"inference thread keeps {scheduling.description}")
        elif priority:
            self.get_logger().info(f"inference thread runs under {scheduling.description}")
        loop(stop)

    def _worker_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            frame = self._mailbox.take(timeout=0.2)
            if frame is None or stop.is_set():
                continue
            try:
                self._process(frame)
            except Exception as exc:  # one bad frame must not end the node's inference
                self._stats.frame_rejected("engine_error")
                if self._log_throttle.ready("engine_error"):
                    self.get_logger().error(f"inference failed: {type(exc).__name__}: {exc}")

    def _decode(self, msg: Any) -> Any:
        if isinstance(msg, CompressedImage):
            return compressed_to_array(msg.format, msg.data)
        return image_to_array(msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data)

    def _process(self, frame: _Frame) -> None:
        from impatient_ros.runtime.preprocess import PreprocessError

        engine = self._engine
        job = self._prepare(frame, self._single)
        if job is None or engine is None:
            return
        try:
            report = engine.run(job.image.array, job.image.channel_order, **self._run_options(job))
        except PreprocessError as exc:
            self._preprocess_failed(job.camera, exc)
            return
        # Any other error (e.g. out of GPU memory in a later stage) propagates to the worker loop, which
        # counts and logs it; if an answer had gone out, the engine already handed publish() its final
        # STOP_ERROR repeat.
        self._finish(job, report)

    def _run_options(self, job: _Job) -> dict[str, Any]:
        """The engine's run arguments for ``job`` (StagedEngine.run and start_run take the same ones)."""
        settings = self._settings
        return {"deadline": job.deadline, "mode": settings.mode, "max_stage": job.cap or None,
                "cascade_threshold": settings.cascade_threshold, "on_result": job.publish}

    def _prepare(self, frame: _Frame, camera: _Camera) -> _Job | None:
        """Decode a frame and fix its deadline and publishing; None when it is rejected (counted)."""
        engine, settings = self._engine, self._settings
        if engine is None:
            return None
        stats = camera.stats
        msg = frame.msg
        try:
            image = self._decode(msg)
        except ImageConversionError as exc:
            stats.frame_rejected(exc.reason)
            if self._log_throttle.ready("image_rejected"):
                self.get_logger().warning(f"image rejected{_on(camera)}: {exc}")
            return None
        ref = reference_time(settings.reference_time, frame.stamp_s, frame.ros_now_s, frame.arrival,
                             max_age_s=settings.max_stamp_age_s)
        if ref.fallback:
            stats.reference_fallback(ref.fallback)
            if ref.fallback != "stamp_unset" and self._log_throttle.ready("reference_fallback"):
                self.get_logger().warning(
                    f"image stamp not trusted ({ref.fallback}){_on(camera)}: {abs(ref.age_s):.3f} s "
                    f"{'before' if ref.age_s > 0 else 'after'} its arrival (max_stamp_age_s "
                    f"{settings.max_stamp_age_s:g} s); its deadline counts from the arrival. Are the camera's and "
                    "this node's clocks synchronised (use_sim_time)?")
        now = time.monotonic()
        budget = self._policy.effective(now)
        if camera.policy is not None:
            budget = camera_budget(camera.policy.effective(now), budget)
        deadline = budget.deadline(ref.monotonic)
        cap = combine_stage_caps(settings.max_stage, budget.max_stage)
        self._seq += 1
        seq, labels, accuracy, vision = self._seq, self._labels, engine.answer_accuracy, self._vision
        engine.admission_quantile = settings.admission_quantile
        engine.top_k = min(settings.top_k, engine.num_classes)
        published_at: list[float] = []

        # The engine hands over exactly one final result per frame. A repeated one (the previous exit
        # re-announced as final: no time for the next stage after all, or a later stage failed) goes
        # to ~/prediction only: that exit's stage topic already has it.
        def publish(result: Any) -> None:
            latency = time.monotonic() - ref.monotonic
            out = build_stage_prediction(
                StagePrediction, result, header=msg.header, image_seq=seq, labels=labels,
                accuracy=stage_accuracy(accuracy, result.stage), latency_s=latency, budget_s=budget.budget_s)
            try:
                # Serialised once, the same bytes on both topics: a publish of a message object converts
                # and serialises it again for every topic, inside the deadline.
                data = serialize_message(out)
                if not result.repeated:
                    camera.stage_pubs[result.stage - 1].publish(data)
                camera.prediction_pub.publish(data)
            except Exception as exc:  # noqa: BLE001 - e.g. a saturated reliable writer; keep inferring
                stats.frame_rejected("publish_failed")
                if self._log_throttle.ready("publish_failed"):
                    self.get_logger().warning(f"could not publish stage {result.stage}{_on(camera)}: {exc}")
                return
            published_at.append(time.monotonic())
            stats.stage_published(result.stage, latency)
            # After ours, so the StagePrediction is not delayed. A repeat is left out: a Classification
            # has no is_final, so it would read as a second answer.
            if vision is not None and not result.repeated:
                try:
                    classification = build_classification(
                        vision.Classification, result, header=msg.header, hypothesis_class=vision.ObjectHypothesis)
                    camera.classification_stage_pubs[result.stage - 1].publish(classification)
                    camera.classification_pub.publish(classification)
                except Exception as exc:  # noqa: BLE001 - the standard copy must not stop our own output
                    stats.frame_rejected("vision_publish_failed")
                    if self._log_throttle.ready("vision_publish_failed"):
                        self.get_logger().warning(f"could not publish vision_msgs for stage {result.stage}: {exc}")

        return _Job(camera, image, ref, budget, deadline, cap, publish, published_at)

    def _preprocess_failed(self, camera: _Camera, exc: Exception) -> None:
        camera.stats.frame_rejected("preprocess_failed")
        if self._log_throttle.ready("preprocess_failed"):
            self.get_logger().warning(f"image rejected by preprocessing{_on(camera)}: {exc}")

    def _finish(self, job: _Job, report: Any) -> None:
        """Count a frame whose last answer went out (or that got none: NO_TIME)."""
        from impatient_ros.runtime.engine import StopReason

        engine = self._engine
        if report.stop_reason is StopReason.NO_TIME and self._log_throttle.ready("no_time"):
            age_ms = 1e3 * (report.began_at - job.ref.monotonic)
            first_ms = self._predicted_ms[0] if self._predicted_ms else math.nan
            self.get_logger().warning(
                f"no time for stage 1{_on(job.camera)}: budget {job.budget.budget_ms:.3f} ms ({job.budget.source}), "
                f"image {age_ms:.1f} ms old at start, stage 1 needs {first_ms:.2f} ms; nothing published")
        published = job.published_at
        job.camera.stats.frame_processed(int(report.stop_reason), job.deadline, published[-1] if published else None,
                                         report.final_repeated)
        if engine is not None:
            self._update_predictions(engine)

    # ------------------------------------------------------------------ inference thread, several cameras
    def _multi_worker_loop(self, stop: threading.Event) -> None:
        """One inference thread for every camera: frames in flight side by side, stages in the scheduler's order.

        Before every stage, each camera without a frame in flight hands over its newest waiting frame
        (its mailbox), then the scheduler (impatient_ros.core.scheduler) picks whose stage runs.
        """
        cameras = {camera.name: camera for camera in self._cameras}
        scheduler = StageScheduler(list(cameras), time.monotonic, policy=self._param("scheduler"),
                                   max_wait_s=self._param("scheduler_max_wait_ms") / 1e3)
        self._scheduler = scheduler
        while not stop.is_set():
            self._wake.clear()  # before looking: a frame put after this sets it again, so none is missed
            for camera in cameras.values():
                if not scheduler.busy(camera.name):
                    frame = camera.mailbox.take(timeout=0.0)
                    if frame is not None:
                        self._start_job(scheduler, camera, frame)
            if scheduler.idle:
                self._wake.wait(0.2)
                continue
            try:
                outcome = scheduler.step()
            except Exception as exc:  # one bad frame must not end the node's inference
                failed = cameras[scheduler.failed] if scheduler.failed is not None else None
                for name, camera in cameras.items():  # frames that left without an outcome: expired, or failed
                    if camera.job is not None and name in scheduler.last_finished:
                        self._finish(camera.job, scheduler.last_finished[name].report)
                        camera.job = None
                if failed is not None:
                    failed.job = None
                    failed.stats.frame_rejected("engine_error")
                if self._log_throttle.ready("engine_error"):
                    self.get_logger().error(f"inference failed{_on(failed)}: {type(exc).__name__}: {exc}")
                continue
            for name, run in outcome.finished:
                camera = cameras[name]
                job, camera.job = camera.job, None
                if job is not None:
                    self._finish(job, run.report)
        # Stopping (deactivate): frames still in flight end here with their last exit as final.
        for name, run in scheduler.in_flight().items():
            camera = cameras[name]
            run.quiet = False  # no re-measuring probe while stopping
            try:
                run.expire()
            except Exception:  # noqa: BLE001 - stopping anyway
                camera.job = None
                continue
            if camera.job is not None:
                self._finish(camera.job, run.report)
                camera.job = None
        self._scheduler = None

    def _start_job(self, scheduler: StageScheduler, camera: _Camera, frame: _Frame) -> None:
        from impatient_ros.runtime.preprocess import PreprocessError

        engine = self._engine
        job = self._prepare(frame, camera)
        if job is None or engine is None:
            return
        try:
            run = engine.start_run(job.image.array, job.image.channel_order, **self._run_options(job))
        except PreprocessError as exc:
            self._preprocess_failed(camera, exc)
            return
        except Exception as exc:  # noqa: BLE001 - counted like an engine error of the single-camera loop
            camera.stats.frame_rejected("engine_error")
            if self._log_throttle.ready("engine_error"):
                self.get_logger().error(f"inference failed{_on(camera)}: {type(exc).__name__}: {exc}")
            return
        camera.job = job
        scheduler.add(camera.name, run)


def _on(camera: _Camera | None) -> str:
    """' on camera <name>' for log lines of a named camera, '' for the single camera."""
    return f" on camera {camera.name}" if camera is not None and camera.name else ""


# --------------------------------------------------------------------------- entry point


def main(args: Sequence[str] | None = None) -> int:
    """Run the node until shut down; returns the process exit status."""
    rclpy.init(args=args)
    node: ImpatientNode | None = None
    status = 0
    try:
        node = ImpatientNode()
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                return 1
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                return 1
        executor = make_executor(node.get_parameter("executor").value)
        node.get_logger().debug(f"executor: {type(executor).__name__}")
        spin(executor, node)
    except ParameterException as exc:
        print(f"{NODE_NAME}: {exc}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # SIGINT/SIGTERM while the node is being built (ros2 launch stopped right after starting it)
        # shuts the context down under the constructor, which then fails on the invalid context: that
        # is a shutdown, not a failure. With the context still up it is a real error.
        if rclpy.ok():
            raise
        print(f"{NODE_NAME}: shut down while starting", file=sys.stderr)
    finally:
        if node is not None:
            node.release_all()
            node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
