"""The inference thread's real-time scheduling (impatient_ros.runtime.realtime), on this machine's kernel.

No mock: the policy is asked of the kernel in a thread of its own, and the
refusal is caused for real in a child process that gives up the permission
(an unprivileged user with no rtprio limit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from impatient_ros.runtime.realtime import MAX_PRIORITY, ThreadScheduling, current_scheduling, use_realtime_priority

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_FIFO is Linux's")


def _permitted(priority: int) -> bool:
    """Whether this process may use SCHED_FIFO at ``priority`` (root, or an rtprio limit that allows it)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= priority


def _in_thread(priority: int) -> tuple[ThreadScheduling, int, int, int]:
    """use_realtime_priority in a new thread: its result, the kernel's policy and priority of that thread
    afterwards, and the policy of a thread that thread started."""
    out = []

    def child_policy() -> None:
        out.append(os.sched_getscheduler(0))

    def body() -> None:
        result = use_realtime_priority(priority)
        policy, rt_priority = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
        child = threading.Thread(target=child_policy)
        child.start()
        child.join()
        out[:0] = [result, policy & ~os.SCHED_RESET_ON_FORK, rt_priority]

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return out[0], out[1], out[2], out[3]


@linux_only
def test_zero_leaves_the_thread_as_it_is() -> None:
    result, policy, priority, _ = _in_thread(0)
    assert policy == os.SCHED_OTHER and priority == 0
    assert result == ThreadScheduling(0, "SCHED_OTHER", 0) and not result.realtime
    assert result.description == "SCHED_OTHER"


@linux_only
@pytest.mark.skipif(not _permitted(5), reason="this process may not use SCHED_FIFO (no CAP_SYS_NICE, rtprio 0)")
def test_the_calling_thread_and_only_it_runs_under_sched_fifo() -> None:
    before = current_scheduling()
    result, policy, priority, child_policy = _in_thread(5)
    assert (policy, priority) == (os.SCHED_FIFO, 5)  # the kernel's view of that thread
    assert result == ThreadScheduling(5, "SCHED_FIFO", 5) and result.realtime
    assert result.description == "SCHED_FIFO 5"
    assert child_policy == os.SCHED_OTHER  # reset on fork: threads it starts do not inherit it
    assert current_scheduling() == before  # this thread is untouched


@linux_only
def test_a_refusal_is_reported_with_its_reason_and_changes_nothing() -> None:
    # A child that cannot use SCHED_FIFO: as root it drops to the unprivileged user nobody with an rtprio
    # limit of 0 (root's CAP_SYS_NICE would ignore the limit); otherwise the limit alone takes it away.
    code = textwrap.dedent("""
        import os, resource
        from impatient_ros.runtime.realtime import use_realtime_priority  # before the files become unreadable
        resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        result = use_realtime_priority(7)
        print(result.policy, result.priority, os.sched_getscheduler(0), "|", result.error, "|", result.description)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    head, error, description = (part.strip() for part in out.stdout.split("|"))
    assert head == f"SCHED_OTHER 0 {os.SCHED_OTHER}"
    assert "permission denied" in error and "CAP_SYS_NICE" in error and "ulimit -r" in error
    assert description == f"SCHED_OTHER (realtime priority 7 not applied: {error})"


@pytest.mark.parametrize("bad", [-1, MAX_PRIORITY + 1, 99, 1.5, True, "5", None])
def test_a_priority_outside_the_range_is_a_configuration_error(bad) -> None:
    with pytest.raises(ValueError, match=f"0..{MAX_PRIORITY}"):
        use_realtime_priority(bad)


@linux_only
def test_the_highest_priority_is_left_to_the_kernel() -> None:
    assert MAX_PRIORITY == os.sched_get_priority_max(os.SCHED_FIFO) - 1
