"""Enter a named network namespace (only the network: mounts stay the node's,
so the FUSE mount and loop device remain visible; `ip netns exec` would not)."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(name: str, run_dir: str = "/run/netns") -> None:
    fd = os.open(os.path.join(run_dir, name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
