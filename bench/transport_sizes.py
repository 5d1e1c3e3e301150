"""Which raw image sizes reach impatient_node over each Fast DDS transport profile (issue 13).

For each profile (Fast DDS's built-in transports, ``config/fastdds_shm.xml`` with
its 16 MiB shared-memory segment, the same with a 64 MiB segment, and Fast DDS's
``LARGE_DATA`` built-in transports) this starts two real node processes, one
subscribing best effort (the node's default) and one reliable, and a publisher
of the same reliability for each, all with that profile in their environment.
It then publishes ``--frames`` rgb8 images of each size, one at a time, and
counts what arrived at the node (its ``frames_received`` diagnostics counter)
and what it answered (a final ``~/prediction`` message within ``--wait`` s).
The latency is the node's own ``latency`` field with ``reference_time:=stamp``:
from the publisher's stamp to the final answer, so it includes the transport.

Run from the repository root (about 8 minutes on a busy 2-core machine; the figures are this machine's):

    OMP_NUM_THREADS=1 ~/.local/share/impatient_ros/venv/bin/python bench/transport_sizes.py

Writes ``bench/results/transport_sizes.md`` and ``.json``.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = [(320, 240), (640, 480), (1280, 720), (1920, 1080), (2560, 1440), (3840, 2160), (4000, 3000)]
RELIABILITIES = ("best_effort", "reliable")
SHM_64_XML = (REPO / "config" / "fastdds_shm.xml").read_text().replace(
    "<segment_size>16777216</segment_size>", "<segment_size>67108864</segment_size>").replace(
    "impatient_shm_16mib", "impatient_shm_64mib")


def profiles(tmp: Path) -> dict[str, dict[str, str]]:
    """Profile name -> environment changes (a value of "" removes the variable)."""
    shm64 = tmp / "fastdds_shm_64mib.xml"
    shm64.write_text(SHM_64_XML)
    plain = {"FASTDDS_DEFAULT_PROFILES_FILE": "", "FASTDDS_BUILTIN_TRANSPORTS": ""}
    return {
        "default": plain,
        "shm_16mib": {**plain, "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_shm.xml")},
        "shm_64mib": {**plain, "FASTDDS_DEFAULT_PROFILES_FILE": str(shm64)},
        "large_data": {**plain, "FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"},
    }


def environment(changes: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------- one profile (a child process)


def run_profile(profile: str, frames: int, wait_s: float, out: Path, workdir: Path) -> None:
    """Start the two nodes, publish every size, write the counts to ``out`` (JSON)."""
    import numpy as np
    import rclpy
    import torch
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from impatient_ros.msg import StagePrediction
    from impatient_ros.ros.image_convert import array_to_image_fields
    from impatient_ros.runtime.checkpoint import save_checkpoint
    from impatient_ros.runtime.model import NetConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetConfig(backbone="smallcnn", num_classes=10, in_channels=1, input_size=(64, 64)))
    checkpoint = workdir / "smallcnn64.pt"
    save_checkpoint(checkpoint, net, class_names=[f"c{i}" for i in range(10)],
                    preprocessing={"input_size": [64, 64], "channels": "gray", "mean": [0.5], "std": [0.25]})

    procs = {}
    for rel in RELIABILITIES:
        log = open(workdir / f"{profile}_{rel}.log", "w")  # noqa: SIM115 - closed with the process
        procs[rel] = (subprocess.Popen(
            [sys.executable, "-m", "impatient_ros.ros.node", "--ros-args", "-r", f"__ns:=/ts_{rel}",
             "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "diagnostics_period_s:=0.2",
             "-p", f"image_reliability:={rel}", "-p", "reference_time:=stamp", "-p", "max_stamp_age_s:=60.0"],
            cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT), log)

    rclpy.init()
    node = rclpy.create_node("transport_sizes")
    lock = threading.Lock()
    finals: dict[str, dict[str, float]] = {rel: {} for rel in RELIABILITIES}
    received: dict[str, int] = dict.fromkeys(RELIABILITIES, -1)
    pubs = {}
    for rel in RELIABILITIES:
        policy = ReliabilityPolicy.RELIABLE if rel == "reliable" else ReliabilityPolicy.BEST_EFFORT
        pubs[rel] = node.create_publisher(Image, f"/ts_{rel}/image", QoSProfile(depth=1, reliability=policy))

        def on_prediction(msg: Any, rel: str = rel) -> None:
            if msg.is_final:
                with lock:
                    finals[rel][msg.header.frame_id] = msg.latency.sec + 1e-9 * msg.latency.nanosec

        node.create_subscription(StagePrediction, f"/ts_{rel}/impatient_node/prediction", on_prediction,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))

    def on_diagnostics(msg: Any) -> None:
        for status in msg.status:
            for rel in RELIABILITIES:
                if status.name.startswith(f"/ts_{rel}/impatient_node:"):
                    values = {kv.key: kv.value for kv in status.values}
                    if values.get("state") == "active":
                        with lock:
                            received[rel] = int(values["frames_received"])

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics,
                             QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinning = True

    def spin() -> None:
        while spinning:
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()

    def until(condition: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            time.sleep(0.02)
        return condition()

    rows = []
    try:
        ready = until(lambda: all(received[r] >= 0 and pubs[r].get_subscription_count() > 0
                                  and node.count_publishers(f"/ts_{r}/impatient_node/prediction") > 0
                                  for r in RELIABILITIES), 180.0)
        if not ready:
            raise RuntimeError(f"{profile}: the nodes did not become active")
        time.sleep(1.0)
        for width, height in SIZES:
            yy, xx = np.mgrid[0:height, 0:width]
            array = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
            msg = Image(**array_to_image_fields(array, "rgb8"))
            with lock:
                start = dict(received)
            ids = []
            for i in range(frames):
                frame_id = f"{width}x{height}_{i}"
                ids.append(frame_id)
                msg.header.frame_id = frame_id
                for rel in RELIABILITIES:
                    ns = time.time_ns()
                    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(ns, 1_000_000_000)
                    pubs[rel].publish(msg)
                until(lambda fid=frame_id: all(fid in finals[r] for r in RELIABILITIES), wait_s)
            time.sleep(1.0)  # a fresh diagnostics status
            with lock:
                for rel in RELIABILITIES:
                    latencies = sorted(finals[rel][f] for f in ids if f in finals[rel])
                    rows.append({
                        "profile": profile, "reliability": rel, "width": width, "height": height,
                        "bytes": int(array.nbytes), "sent": frames, "received": received[rel] - start[rel],
                        "answered": len(latencies),
                        "latency_median_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
                    })
            print(f"{profile} {width}x{height}: " + ", ".join(
                f"{r['reliability']} {r['received']}/{r['answered']}/{r['sent']}" for r in rows[-2:]), flush=True)
    finally:
        spinning = False
        thread.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown()
        for proc, log in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    out.write_text(json.dumps(rows))


# --------------------------------------------------------------------------- all profiles


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per size, one column per profile and reliability ("answered/sent, median ms")."""
    keys = []
    for row in rows:
        key = (row["profile"], row["reliability"])
        if key not in keys:
            keys.append(key)
    lines = ["| image (rgb8) | bytes | " + " | ".join(f"{p}, {r}" for p, r in keys) + " |",
             "|---|---:|" + "---|" * len(keys)]
    for width, height in SIZES:
        cells = []
        size_bytes = None
        for key in keys:
            row = next((r for r in rows if (r["profile"], r["reliability"]) == key
                        and (r["width"], r["height"]) == (width, height)), None)
            if row is None:
                cells.append("-")
                continue
            size_bytes = row["bytes"]
            cell = f"{row['received']}/{row['sent']}"
            if row["answered"] != row["received"]:
                cell += f" ({row['answered']} answered)"
            if row["latency_median_ms"] is not None:
                cell += f", {row['latency_median_ms']:.0f} ms"
            cells.append(cell)
        lines.append(f"| {width}x{height} | {size_bytes:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3, help="images per size and profile")
    parser.add_argument("--wait", type=float, default=4.0, help="seconds to wait for each image's answer")
    parser.add_argument("--profiles", default="default,shm_16mib,shm_64mib,large_data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transport_sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_profile(args.child, args.frames, args.wait, args.child_out, args.workdir)
        return 0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        available = profiles(tmp_path)
        for name in args.profiles.split(","):
            child_out = tmp_path / f"{name}.json"
            # Each profile in its own process: Fast DDS reads the environment when rclpy starts.
            result = subprocess.run(
                [sys.executable, __file__, "--child", name, "--child-out", str(child_out), "--workdir", tmp,
                 "--frames", str(args.frames), "--wait", str(args.wait)],
                env=environment(available[name]), cwd=REPO, check=False)
            if result.returncode != 0 or not child_out.is_file():
                print(f"{name}: failed (status {result.returncode}); logs in {tmp}", file=sys.stderr)
                for log in sorted(tmp_path.glob(f"{name}_*.log")):
                    print(log.read_text()[-2000:], file=sys.stderr)
                continue
            rows += json.loads(child_out.read_text())
    markdown = ("Raw rgb8 images reaching impatient_node (received at the node / sent; median latency from "
                "the publisher's stamp to the final answer). Publisher and node subscription of the same "
                "reliability, one image at a time, both processes on one host.\n\n" + table(rows) + "\n")
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # with_name, not with_suffix: a stem with a dot ("sizes_16.5MiB") keeps its whole name.
    args.out.with_name(args.out.name + ".md").write_text(markdown)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
