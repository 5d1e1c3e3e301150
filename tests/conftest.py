"""Shared test set-up.

ROS 2 traffic stays on this host and in a domain of its own for each test
session and each of its pytest-xdist workers, so parallel runs (or a robot on
the same network) never cross-talk.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the source modules are what we test
    sys.path.insert(0, str(REPO))

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def _session_domain_id() -> int:
    """This session's DDS domain: never 0 (what everybody uses), one of its own per pytest-xdist worker.

    Domain ids 1..101 are valid with the default port mapping. Without workers it is
    ROS_DOMAIN_ID if set, else a random one. The workers of one run (scripts/test.sh
    runs two) share the run's id (PYTEST_XDIST_TESTRUNUID) and take consecutive
    domains from a base drawn from it (or from ROS_DOMAIN_ID), so their tests, which
    use the same topic names, never hear each other.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    given = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if not worker.startswith("gw"):
        return int(given) if given.isdigit() else random.Random(os.getpid()).randint(1, 101)
    base = int(given) if given.isdigit() else random.Random(os.environ.get("PYTEST_XDIST_TESTRUNUID", "")).randint(1, 101)
    return (base - 1 + int(worker[2:])) % 101 + 1


os.environ["ROS_DOMAIN_ID"] = str(_session_domain_id())

from impatient_ros.core.datasets import default_fashion_mnist_dir  # noqa: E402  (after the sys.path line)

FASHION_MNIST_DIR = default_fashion_mnist_dir()


# In CI a missing prerequisite is a failure, not a skip: the set-up script must provide it.
IN_CI = bool(os.environ.get("CI"))
requires_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists() and not IN_CI,
    reason=f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run every test with one torch thread (the node's default), and restore the count afterwards.

    Two threads on two cores that the test's own node processes, or anything else,
    also want do not run twice as fast: they wait for each other at every
    operator, and a fake-clock simulation of a few thousand stages then took
    minutes instead of seconds. A test that needs more threads sets them itself.
    Tests that never loaded torch pay nothing.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# Markers say what a test needs, so the pure tests can run alone in seconds:
#   scripts/test.sh -m "not ros and not build and not train and not slow"
# A test file's tier is stated here, in one table, rather than in every file;
# single slow tests elsewhere carry @pytest.mark.slow themselves.
MARKERS_BY_MODULE = {
    "test_node": "ros",                 # real node processes over real DDS
    "test_tools": "ros",
    "test_reliability": "ros",
    "test_messages_transport": "ros",
    "test_vision_msgs": "ros",          # also builds the vision_msgs test fixture once (cached)
    "test_launch": "ros",               # real launch/launch_ros runs, where they can be imported
    "test_node_limits": "ros",
    "test_node_multicam": "ros",        # a two-camera node process
    "test_build": "build",              # pip and colcon builds into fresh prefixes
    "test_training": "train",           # trains networks
    "test_distributed": "train",
    "test_evaluate": "train",
    "test_baselines": "train",
    "test_recipe": "train",             # LP-FT, refit and ensembles fitted on small networks
    "test_conv_head_training": "train", # conv heads: a short run, LP-FT start and refit on tiny networks
}


# The longest test files, longest first (build, training and node-process files). scripts/test.sh
# gives whole files to two workers in collection order (--dist loadfile --no-loadscope-reorder):
# starting the long ones first keeps a worker from running one of them alone at the end while the
# other idles. Only the order changes; see the current times with scripts/test.sh --durations=0.
LONGEST_FIRST = ("test_build", "test_training", "test_reliability", "test_model", "test_node", "test_tools",
                 "test_recipe", "test_distributed", "test_node_limits", "test_node_multicam", "test_vision_msgs",
                 "test_image_convert")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = MARKERS_BY_MODULE.get(Path(str(item.fspath)).stem)
        if marker is not None:
            item.add_marker(marker)
    rank = {stem: i for i, stem in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable: files stay whole
