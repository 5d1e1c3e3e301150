"""End-to-end latency of impatient_node: camera publish -> each stage's message, against the engine's own time.

Prints measured figures (not a test; nothing is asserted). For each image size
a node process is started, a camera stand-in in this process publishes rgb8
images best effort at ``--rate`` Hz, and a subscriber records when each
StagePrediction arrives. The node process is this script in ``--serve`` mode:
the real :class:`impatient_ros.ros.node.ImpatientNode`, with the engine's run
wrapped to record, per frame, the arrival of the image, the start of the run
and every exit's ``elapsed_s`` / ``ready_time``. Linux's monotonic clock is
shared by all processes, so the two sides' timestamps compare directly.

Per stage k of each frame:

    end-to-end  = message received - image published
    engine      = the engine's elapsed_s for exit k (preprocessing included)
    overhead    = end-to-end - engine
                = transport in + mailbox wait and decoding + message build,
                  publication and transport out

Before each size the same measurement runs against a relay: a bare rclpy node
with the node's names, QoS, executor and message type that answers each image
at once, without inference. Its end-to-end time is the floor any rclpy node on
this host pays (DDS transport both ways, the executors' wake-ups); the node's
overhead minus that floor is what the node itself adds.

Large images need a bigger Fast DDS shared-memory segment than the default
~512 KiB (see FACTS.md): the script sets FASTDDS_DEFAULT_PROFILES_FILE to
config/fastdds_shm.xml (16 MiB) for itself and the node unless
``--no-shm-profile`` is given.

    OMP_NUM_THREADS=1 python bench/bench_node.py                 # 224x224 and 640x480 at 30 Hz, 10 s each
    python bench/bench_node.py --seconds 5 --sizes 640x480 --checkpoint models/fashion_mnist_smallcnn.pt
    python bench/bench_node.py --device cuda --checkpoint my_resnet18.pt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHM_PROFILE = REPO / "config" / "fastdds_shm.xml"
NAMESPACE = "/bench"


# --------------------------------------------------------------------------- node side (--serve)


def serve(trace_path: Path, ros_args: list[str]) -> int:
    """Run ImpatientNode with the engine's runs traced; write the trace as JSON on shutdown."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.lifecycle import TransitionCallbackReturn

    from impatient_ros.ros.executors import make_executor, spin
    from impatient_ros.ros.node import ImpatientNode

    rclpy.init(args=["impatient_node", "--ros-args", *ros_args])
    node = ImpatientNode()
    trace: list[dict] = []
    current = threading.local()
    try:
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return 1
        engine = node._engine  # bench instrumentation: wrap the engine the node drives
        original_run, original_process = engine.run, node._process

        def process(frame):
            current.frame = frame
            original_process(frame)

        def run(*args, **kwargs):
            report = original_run(*args, **kwargs)
            frame = current.frame
            trace.append({"frame_id": frame.msg.header.frame_id, "arrival": frame.arrival,
                          "began": report.began_at, "stop": int(report.stop_reason),
                          # a repeated final answer ran no stage: one row per stage that ran
                          "stages": [[r.stage, r.elapsed_s, r.ready_time] for r in report.results
                                     if not r.repeated]})
            return report

        node._process, engine.run = process, run
        if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            return 1
        spin(make_executor(node.get_parameter("executor").value), node)  # as impatient_node's main does
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.release_all()
        trace_path.write_text(json.dumps({"frames": trace}))
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def relay(trace_path: Path, ros_args: list[str]) -> int:
    """The floor any rclpy node pays: take each image, publish one StagePrediction at once, no inference.

    Same names, QoS, executor choice and message type as the node; the trace has
    the arrival of each image and the time its answer was handed to rclpy.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from impatient_ros.ros.image_convert import image_to_array
    from impatient_ros.msg import StagePrediction
    from impatient_ros.ros.executors import make_executor, spin

    rclpy.init(args=["relay", "--ros-args", *ros_args])
    node = rclpy.create_node("impatient_node")
    node.declare_parameter("executor", "events")
    trace: list[dict] = []
    pub = node.create_publisher(StagePrediction, "~/prediction", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))

    def on_image(msg: Image) -> None:
        arrival = time.monotonic()
        image_to_array(msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step, msg.data)  # as the node does
        out = StagePrediction(header=msg.header, stage=1, num_stages=1, is_final=True)
        ready = time.monotonic()
        pub.publish(out)
        trace.append({"frame_id": msg.header.frame_id, "arrival": arrival, "began": arrival, "stop": 0,
                      "stages": [[1, ready - arrival, ready]]})

    node.create_subscription(Image, "image", on_image, QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        spin(make_executor(node.get_parameter("executor").value), node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        trace_path.write_text(json.dumps({"frames": trace}))
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


# --------------------------------------------------------------------------- bench side


def _parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def measure(size: tuple[int, int], args: argparse.Namespace, checkpoint: Path, workdir: Path,
            serve_mode: str = "--serve") -> dict:
    """Run one node (or ``--relay``) process for one image size; return sent/received times and its trace."""
    import numpy as np
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from impatient_ros.ros.image_convert import array_to_image_fields
    from impatient_ros.msg import StagePrediction
    from impatient_ros.ros.executors import make_executor

    width, height = size
    trace_path = workdir / f"trace_{width}x{height}{serve_mode}.json"
    log_path = workdir / f"node_{width}x{height}{serve_mode}.log"
    ros_args = ["-p", f"checkpoint:={checkpoint}", "-p", f"device:={args.device}", "-p", "reference_time:=arrival",
                "-p", f"executor:={args.executor}", "-r", f"__ns:={NAMESPACE}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, serve_mode, str(trace_path), "--ros-args", *ros_args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    rclpy.init()
    node = rclpy.create_node("bench_camera")
    received: dict[str, dict[int, float]] = defaultdict(dict)
    lock = threading.Lock()

    def on_prediction(msg: StagePrediction) -> None:
        now = time.monotonic()
        with lock:
            received[msg.header.frame_id].setdefault(msg.stage, now)

    camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)  # what a camera driver uses
    pub = node.create_publisher(Image, f"{NAMESPACE}/image", camera_qos)
    node.create_subscription(StagePrediction, f"{NAMESPACE}/impatient_node/prediction", on_prediction,
                             QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    executor = make_executor(args.executor)  # the subscriber side: the same kind as the node's
    executor.add_node(node)
    spinning = True

    def spin() -> None:
        while spinning:
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    sent: dict[str, float] = {}
    try:
        end = time.monotonic() + 120
        while pub.get_subscription_count() == 0 or node.count_publishers(
                f"{NAMESPACE}/impatient_node/prediction") == 0:
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the node did not come up; its log:\n{log_path.read_text()}")
            time.sleep(0.1)
        rng = np.random.default_rng(0)
        fields = array_to_image_fields(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "rgb8")
        msg = Image(**fields)
        period = 1.0 / args.rate
        frames = int(args.seconds * args.rate)
        warmup = int(args.rate)  # the first second is not counted (allocation, SHM segment set-up)
        start = time.monotonic()
        for i in range(warmup + frames):
            time.sleep(max(0.0, start + i * period - time.monotonic()))
            frame_id = f"{'w' if i < warmup else 'f'}{i}"
            msg.header.frame_id = frame_id
            ns = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 1_000_000_000, ns % 1_000_000_000
            sent[frame_id] = time.monotonic()
            pub.publish(msg)
        time.sleep(1.0)  # the last answers
    finally:
        spinning = False
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not trace_path.exists():
        raise SystemExit(f"the node wrote no trace; its log:\n{log_path.read_text()}")
    trace = json.loads(trace_path.read_text())["frames"]
    return {"sent": sent, "received": dict(received), "trace": trace}


def report(size: tuple[int, int], data: dict, what: str = "") -> None:
    """Print per-stage end-to-end, engine and overhead figures for one size."""
    import numpy as np

    from _common import print_table

    sent, received = data["sent"], data["received"]
    trace = {t["frame_id"]: t for t in data["trace"] if t["frame_id"].startswith("f")}
    counted = [f for f in sent if f.startswith("f")]
    rows_by_stage: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for frame_id in counted:
        t = trace.get(frame_id)
        if t is None:
            continue
        for stage, elapsed, ready in t["stages"]:
            got = received.get(frame_id, {}).get(stage)
            if got is None:
                continue
            e2e = got - sent[frame_id]
            row = rows_by_stage[stage]
            row["e2e"].append(e2e)
            row["engine"].append(elapsed)
            row["overhead"].append(e2e - elapsed)
            row["in"].append(t["arrival"] - sent[frame_id])
            row["queue"].append(t["began"] - t["arrival"])
            row["out"].append(got - ready)

    def ms(values: list[float], q: float) -> float:
        return 1e3 * float(np.quantile(values, q))

    width, height = size
    processed = sum(1 for f in counted if f in trace)
    answered = sum(1 for f in counted if f in received)
    rate = 1 / np.median(np.diff(sorted(sent.values())))
    print(f"== {what}{width}x{height} rgb8 ({width * height * 3 / 2**20:.2f} MiB) at {rate:.1f} Hz: "
          f"{len(counted)} published, {processed} processed by the node, {answered} answered "
          f"(the rest replaced in the mailbox or lost in transport)")
    rows = []
    for stage in sorted(rows_by_stage):
        r = rows_by_stage[stage]
        rows.append((stage, len(r["e2e"]), ms(r["e2e"], 0.5), ms(r["e2e"], 0.99), ms(r["engine"], 0.5),
                     ms(r["overhead"], 0.5), ms(r["overhead"], 0.99), ms(r["in"], 0.5), ms(r["queue"], 0.5),
                     ms(r["out"], 0.5)))
    print_table(["stage", "n", "e2e p50", "e2e p99", "engine p50", "overhead p50", "overhead p99",
                 "in p50", "wait+decode p50", "out p50"], rows)


def main() -> int:
    """Parse arguments and run the benchmark (or the node, with --serve)."""
    if len(sys.argv) > 2 and sys.argv[1] in ("--serve", "--relay"):
        ros_args = sys.argv[sys.argv.index("--ros-args") + 1:] if "--ros-args" in sys.argv else []
        return (serve if sys.argv[1] == "--serve" else relay)(Path(sys.argv[2]), ros_args)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["224x224", "640x480"], help="WIDTHxHEIGHT of the images")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per size")
    parser.add_argument("--checkpoint", help="checkpoint to run (default: embedded model or random smallcnn)")
    parser.add_argument("--device", default="cpu", help="node device parameter (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--executor", default="events", choices=["events", "single"],
                        help="executor of the node (its 'executor' parameter) and of this side's subscriber")
    parser.add_argument("--no-relay", action="store_true",
                        help="skip the relay baseline (a bare rclpy node answering each image at once)")
    parser.add_argument("--no-shm-profile", action="store_true",
                        help="do not set FASTDDS_DEFAULT_PROFILES_FILE (large images then fail best effort)")
    args = parser.parse_args()
    # Read by Fast DDS when a participant is created: set before rclpy.init here and in the child.
    if not args.no_shm_profile:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(SHM_PROFILE)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
    from _common import checkpoint_file
    print(f"FASTDDS_DEFAULT_PROFILES_FILE={os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE', '(unset)')}, "
          f"device={args.device}, executor={args.executor}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    with tempfile.TemporaryDirectory(prefix="bench_node_") as tmp:
        workdir = Path(tmp)
        checkpoint = checkpoint_file(args.checkpoint, workdir)
        print(f"checkpoint: {checkpoint}\n")
        for text in args.sizes:
            size = _parse_size(text)
            if not args.no_relay:
                report(size, measure(size, args, checkpoint, workdir, "--relay"), "relay baseline (no inference), ")
            report(size, measure(size, args, checkpoint, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
