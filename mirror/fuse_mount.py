"""Mounting the one-file FUSE filesystem, and handing its /dev/fuse fd around.

The fd lives in a tiny holder process (fdholder.py) for the life of the mount;
frontend workers borrow it over a unix socket (SCM_RIGHTS), so a worker can die
and be replaced without the kernel aborting the connection.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import time

from engine.errors import Unavailable

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_fuse(fuse_fd: int, mountpoint: str, name: str) -> None:
    opts = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    _check(_libc.mount(name.encode(), mountpoint.encode(), b"fuse.tandem", MS_NOSUID | MS_NODEV,
                       opts.encode()), f"mount {mountpoint}")


def umount_lazy(mountpoint: str) -> None:
    _check(_libc.umount2(mountpoint.encode(), MNT_DETACH), f"umount {mountpoint}")


def is_mounted(mountpoint: str) -> bool:
    target = os.path.abspath(mountpoint)  # no realpath: stat would wait for FUSE INIT
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def holder_request(sock_path: str, msg: dict, timeout_s: float = 5.0) -> tuple[dict, int | None]:
    """Ask the holder; 'get' answers with the fd (a new descriptor in this process)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout_s)
    try:
        s.connect(sock_path)
        s.send(json.dumps(msg).encode())
        data, fds, _, _ = socket.recv_fds(s, 65536, 1)
    except OSError as e:
        raise Unavailable(f"fd holder {sock_path}: {e}") from e
    finally:
        s.close()
    return json.loads(data or b"{}"), (fds[0] if fds else None)


def wait_for(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out waiting for {what}")
        time.sleep(0.02)
