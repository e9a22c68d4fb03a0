"""Owner-only modes for what holds tenants' data: the state, the pool, the volumes.

Files are 0600 and directories 0700 when the driver makes them. At every start the ones
already there are checked, and looser modes (an older release made `state.sqlite` and the
pool image 0644) are tightened with a warning naming the path and both modes. Tightening,
not refusing: the driver owns these paths and the fix is unambiguous, while refusing would
turn an upgrade into an outage; the warning tells the operator the data was readable.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def tighten(path: str, allowed: int) -> bool:
    """Drop every mode bit of path outside `allowed` (and warn when any was set).
    False when path does not exist."""
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    if current & ~allowed:
        os.chmod(path, current & allowed)
        log.warning("%s had mode %04o, readable or writable beyond its owner: tightened to %04o",
                    path, current, current & allowed)
    return True


def private_dir(path: str) -> str:
    """A directory only its owner can enter: made 0700, or tightened to it."""
    os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
    tighten(path, PRIVATE_DIR)
    return path


def private_file(path: str) -> str:
    """A file only its owner can read: made empty with 0600 when missing (never truncated),
    or tightened to it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE))
    tighten(path, PRIVATE_FILE)
    return path
