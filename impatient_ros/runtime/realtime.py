"""Real-time scheduling of the inference thread (Linux ``SCHED_FIFO``).

Why: admission starts a stage only when its measured p99 fits before the
deadline, but under the kernel's fair scheduler (``SCHED_OTHER``) every other
runnable task on the machine (the camera driver, a subscriber, DDS threads, a
build) can take the core from the inference thread in the middle of a stage
for a whole time slice (milliseconds). That pause is not in the stage's
timing window, so the answer comes late. A ``SCHED_FIFO`` thread is not
preempted by normal tasks: it runs until it blocks (waits for the next frame)
or a task of a higher real-time priority wants its core. This is what the
ROS 2 real-time guidance asks of a control or perception loop; ros2_control's
``thread_priority`` and realtime_tools do the same.

Only the calling thread: the policy is set with ``SCHED_RESET_ON_FORK``, so
threads and processes it starts later (torch's worker pools, a subprocess)
get the normal policy back instead of inheriting a real-time one.

What keeps the machine alive: the kernel's real-time throttling
(``/proc/sys/kernel/sched_rt_runtime_us``, 950000 of every 1000000 us by
default) leaves normal tasks at least 5 % of each core even if the thread
spun, and the inference thread sleeps between frames. The same throttling is
the limit of this setting: a real-time thread that computes through a whole
second (a network slower than its frame rate, or a benchmark loop) is paused
by the kernel for the rest of that second, 50 ms, far longer than the
preemptions it avoids (bench/results/engine_cpu_realtime.md). It pays where
the thread has idle time between frames, which is the node's normal case.

Permission: ``CAP_SYS_NICE`` (root, or a container started with it), or an
``RLIMIT_RTPRIO`` at least the priority (``ulimit -r``; on a robot, e.g.
``@realtime - rtprio 98`` in /etc/security/limits.conf and the user in that
group). Without it the thread keeps the normal policy and the result says why;
nothing else changes.

Pure: no ROS import (the node asks for it from its inference thread and
reports :attr:`ThreadScheduling.description` in its diagnostics).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

__all__ = ["MAX_PRIORITY", "ThreadScheduling", "current_scheduling", "use_realtime_priority"]

# SCHED_FIFO priorities run 1..99 on Linux; 99 is left to the kernel's own threads (watchdogs, migration),
# which a user thread must never starve.
MAX_PRIORITY = 98


@dataclass(frozen=True)
class ThreadScheduling:
    """What :func:`use_realtime_priority` asked for and what the calling thread got."""

    requested: int  # the priority asked for (0: none)
    policy: str  # "SCHED_FIFO" or "SCHED_OTHER" (the thread's policy afterwards; others by name)
    priority: int  # the thread's real-time priority afterwards (0 under SCHED_OTHER)
    error: str = ""  # why the request was not applied ("" when it was, or when none was made)

    @property
    def realtime(self) -> bool:
        """Whether the thread now runs under SCHED_FIFO."""
        return self.policy == "SCHED_FIFO"

    @property
    def description(self) -> str:
        """One line for logs and diagnostics: "SCHED_FIFO 10", or "SCHED_OTHER (realtime priority 10 not applied: ...)"."""
        text = f"{self.policy} {self.priority}" if self.realtime else self.policy
        if self.error:
            text += f" (realtime priority {self.requested} not applied: {self.error})"
        return text


_POLICY_NAMES = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                                      "SCHED_IDLE") if hasattr(os, name)}


def current_scheduling(requested: int = 0, error: str = "") -> ThreadScheduling:
    """The calling thread's scheduling policy and priority (``pid`` 0 is the calling thread on Linux)."""
    if not hasattr(os, "sched_getscheduler"):
        return ThreadScheduling(requested, "SCHED_OTHER", 0, error)
    policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    return ThreadScheduling(requested, _POLICY_NAMES.get(policy, str(policy)), os.sched_getparam(0).sched_priority,
                            error)


def use_realtime_priority(priority: int) -> ThreadScheduling:
    """Run the calling thread under SCHED_FIFO at ``priority`` (1..MAX_PRIORITY); 0 leaves it as it is.

    Never raises for a refusal: a machine without the permission (or not
    Linux) keeps the normal policy, and the returned ``error`` says why and
    what grants it. Only a priority outside 0..MAX_PRIORITY is a ValueError
    (a configuration mistake, not a property of the machine).
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"realtime priority must be an integer in 0..{MAX_PRIORITY}, got {priority!r}")
    if priority == 0:
        return current_scheduling()
    if not sys.platform.startswith("linux") or not hasattr(os, "SCHED_FIFO"):
        return current_scheduling(priority, f"SCHED_FIFO is Linux only (this is {sys.platform})")
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0), os.sched_param(priority))
    except PermissionError:
        return current_scheduling(priority, "permission denied: needs CAP_SYS_NICE or an rtprio limit of at "
                                            f"least {priority} (ulimit -r; /etc/security/limits.conf)")
    except OSError as exc:
        return current_scheduling(priority, f"{type(exc).__name__}: {exc.strerror or exc}")
    return current_scheduling(priority)
