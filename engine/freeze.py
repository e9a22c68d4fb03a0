"""Filesystem freezes for consistent snapshots, recorded so a crash never leaves one frozen.

The freeze is recorded (engine/node_records.py) before FIFREEZE and removed after FITHAW;
on start-up `thaw_all_recorded()` thaws whatever a crash left frozen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator

from engine.node_records import FreezeRecord, NodeRecords
from engine.state import Store

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def _ioctl(mount_point: str, request: int) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


class Freezer:
    def __init__(self, store: Store):
        self.records = NodeRecords(store)

    def thaw(self, mount_point: str) -> None:
        try:
            _ioctl(mount_point, FITHAW)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: it was not frozen
                raise
        self.records.delete_freeze(mount_point)

    @contextlib.contextmanager
    def frozen(self, mount_points: list[str]) -> Iterator[None]:
        """Freeze each mount point (in a fixed order), yield, and always thaw them all."""
        done: list[str] = []
        try:
            for mp in sorted(set(mount_points)):
                self.records.put_freeze(FreezeRecord(mp, frozen_at=time.time(), pid=os.getpid()))
                _ioctl(mp, FIFREEZE)  # flushes the filesystem and blocks new writes
                done.append(mp)
            yield
        finally:
            for mp in reversed(done):
                self.thaw(mp)
            for mp in set(mount_points) - set(done):
                self.records.delete_freeze(mp)

    def freeze(self, mount_point: str) -> None:
        """Freeze one filesystem until thaw() (recorded first: a crash never leaves it
        frozen past the next start). For a freeze that spans calls; else frozen()."""
        self.records.put_freeze(FreezeRecord(mount_point, frozen_at=time.time(),
                                             pid=os.getpid()))
        try:
            _ioctl(mount_point, FIFREEZE)
        except BaseException:
            self.records.delete_freeze(mount_point)
            raise

    def thaw_all_recorded(self) -> None:
        for freeze in self.records.list_freezes():
            log.warning("thawing %s, left frozen by an interrupted snapshot",
                        freeze.mount_point)
            self.thaw(freeze.mount_point)
