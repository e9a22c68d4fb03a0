"""A minimal inotify binding (ctypes): the v1 enforcer watches pod cgroups for new containers.

mkdir/rmdir on cgroupfs go through the VFS, so they raise IN_CREATE/IN_DELETE like any
directory (checked on this kernel's cgroup v1).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass

IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVED_TO = 0x00000080
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000

DIR_EVENTS = IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVED_TO | IN_ONLYDIR

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int = DIR_EVENTS) -> int:
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}", path)
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        # EINVAL when the watch is already gone (directory removed): nothing to undo.
        _libc.inotify_rm_watch(self._fd, wd)

    def read_events(self) -> list[Event]:
        """Every queued event, without blocking."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _HEADER.size <= len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                name = data[start : start + length].rstrip(b"\0")
                events.append(Event(wd, mask, os.fsdecode(name)))
                offset = start + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
