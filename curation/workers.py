"""How worker processes start (fork or spawn) and die with their parent: shared by dedup's hashing
pool and training's data loaders."""

from __future__ import annotations

import os
import signal


def usable_cores() -> int:
    """Cores this process may use (the affinity mask, which containers narrow; cpu_count is the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_context(workers: int):
    """How worker processes start: forked (fast) from a plain process; spawned when this process
    handles SIGTERM itself (an orchestrator's flow-run process, e.g. Prefect's). Forked workers
    inherit that handler, so the SIGTERM that ends a worker raises the orchestrator's termination
    exception in it (a traceback in the run's log, exit code 1). Spawned workers start clean
    and stay children of this process, so they notice when it is killed and exit with it (a fork
    server would outlive it and keep the run's output pipe open). None: the default (fork)."""
    if workers == 0 or signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        return None
    import multiprocessing as mp

    return mp.get_context("spawn")


def die_with_parent(_worker_id: int = 0) -> None:
    """Worker init (Linux): the kernel kills the worker when its parent dies, even by SIGKILL.
    Otherwise a worker blocked on a full queue outlives it, holding the run's output pipe open,
    and an orchestrator never sees the run end."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own parent watchdog remains
        return
    if os.getppid() == 1:  # the parent died before the line above took effect
        os._exit(0)
