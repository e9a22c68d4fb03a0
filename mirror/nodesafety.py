"""Keep the frontend alive and unblocked while it serves its own node's writeback."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57  # allocations behave as GFP_NOIO: no reclaim recursion into our own device
MCL_CURRENT, MCL_FUTURE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def harden(oom_score_adj: int = -1000, lock_memory: bool = True) -> list[str]:
    """Apply what the kernel allows; returns the steps that failed (logged, not fatal)."""
    failed = []
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        failed.append(f"PR_SET_IO_FLUSHER: errno {ctypes.get_errno()}")
    if lock_memory and _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        failed.append(f"mlockall: errno {ctypes.get_errno()}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(oom_score_adj))
    except OSError as e:
        failed.append(f"oom_score_adj: {e}")
    for msg in failed:
        log.warning("node safety: %s", msg)
    return failed
