"""How volumes and snapshots sit in the pool: plain reflinked files, or btrfs subvolumes.

Both give copy-on-write snapshots, restores and clones; they differ in what those cost:
- FileLayout (XFS, reflink=1): `volumes/NAME.img`, snapshots `snapshots/NAME.img`. A
  reflink costs per extent (about 20 us each), so extent-size hints bound the extents
  random writes leave; writes after a snapshot fragment the file again.
- SubvolumeLayout (btrfs): each volume is a subvolume holding `data.img` (nodatacow:
  overwritten in place until a snapshot shares it), snapshots are read-only subvolume
  snapshots. Snapshot, restore and clone are constant time whatever the extents.
Names are drawn by the engine (hex), never taken from a request.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
from typing import Protocol

from engine import btrfs, command, fileops, permissions
from engine.errors import AlreadyExists, InvalidSpec, NotFound, OutOfCapacity

log = logging.getLogger(__name__)

VOLUMES_DIR, SNAPSHOTS_DIR = "volumes", "snapshots"
MIB = 1024 * 1024
# XFS extent-size and CoW extent-size hints on the volume directories (see docs/engine.md)
EXTENT_HINT_BYTES = 16 * MIB
_NAME = re.compile(r"^[0-9a-f]{32}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidSpec(f"bad pool object name {name!r}")
    return name


def _space_error(e: OSError) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutOfCapacity(f"pool is full: {e.strerror}")
    return e


class Layout(Protocol):
    kind: str

    def setup(self) -> None: ...
    def volume_path(self, name: str) -> str: ...
    def snapshot_path(self, name: str) -> str: ...
    def create_volume(self, name: str, size_bytes: int) -> None: ...
    def clone_volume(self, source: str, name: str) -> None: ...
    def snapshot_volume(self, volume: str, name: str) -> None: ...
    def restore_snapshot(self, snapshot: str, name: str) -> None: ...
    def delete_volume(self, name: str) -> None: ...
    def delete_snapshot(self, name: str) -> None: ...
    def volumes(self) -> list[str]: ...
    def snapshots(self) -> list[str]: ...


class FileLayout:
    kind = "files"

    def __init__(self, root: str, fs_type: str):
        self.root = root
        self.fs_type = fs_type
        self.volumes_dir = os.path.join(root, VOLUMES_DIR)
        self.snapshots_dir = os.path.join(root, SNAPSHOTS_DIR)

    def setup(self) -> None:
        for d in (self.volumes_dir, self.snapshots_dir):
            permissions.private_dir(d)
            if self.fs_type == "xfs":
                hint = EXTENT_HINT_BYTES // 1024
                command.run(["xfs_io", "-c", f"extsize {hint}k", "-c", f"cowextsize {hint}k", d])

    def volume_path(self, name: str) -> str:
        return os.path.join(self.volumes_dir, check_name(name) + ".img")

    def snapshot_path(self, name: str) -> str:
        return os.path.join(self.snapshots_dir, check_name(name) + ".img")

    def create_volume(self, name: str, size_bytes: int) -> None:
        # Not forced to disk: see VolumeFiles.reconcile (an empty volume lost to a power
        # cut is remade; the first flush through its device makes it durable).
        path = self.volume_path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"{path} exists") from None
        try:
            os.ftruncate(fd, size_bytes)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise _space_error(e) from None
        os.close(fd)

    def _reflink(self, src: str, dst: str, directory: str) -> None:
        try:
            fileops.reflink(src, dst)
        except FileNotFoundError:
            raise NotFound(f"{src} is missing") from None
        except OSError as e:
            raise _space_error(e) from None
        fileops.fsync_dir(directory)

    def clone_volume(self, source: str, name: str) -> None:
        self._reflink(self.volume_path(source), self.volume_path(name), self.volumes_dir)

    def snapshot_volume(self, volume: str, name: str) -> None:
        self._reflink(self.volume_path(volume), self.snapshot_path(name), self.snapshots_dir)

    def restore_snapshot(self, snapshot: str, name: str) -> None:
        self._reflink(self.snapshot_path(snapshot), self.volume_path(name), self.volumes_dir)

    def delete_volume(self, name: str) -> None:
        # No fsync: the owning record goes first; a file back after a power cut is unowned.
        try:
            os.unlink(self.volume_path(name))
        except FileNotFoundError:
            pass

    def delete_snapshot(self, name: str) -> None:
        try:
            os.unlink(self.snapshot_path(name))
        except FileNotFoundError:
            pass

    @staticmethod
    def _names(directory: str) -> list[str]:
        return sorted(n[:-4] for n in os.listdir(directory)
                      if n.endswith(".img") and _NAME.match(n[:-4]))

    def volumes(self) -> list[str]:
        return self._names(self.volumes_dir)

    def snapshots(self) -> list[str]:
        return self._names(self.snapshots_dir)


class _Reclaimer:
    """Commits btrfs transactions in the background after subvolume deletes.

    A deleted subvolume's space returns in three steps: a commit makes the deletion
    visible, the cleaner thread drops its tree, and the next commit unpins the freed
    extents. By default that takes up to a minute; a few commits spread over a few
    seconds make it seconds, without blocking DeleteVolume on any of them.
    """

    DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, root: str):
        self._root = root
        self._poked = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="btrfs-reclaim").start()

    def poke(self) -> None:
        # cheap when already poked: a delete must not wake this thread, only mark the pool
        # (a wake-up per delete costs a context switch and a fight for the GIL)
        if not self._poked.is_set():
            self._poked.set()

    def _loop(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            for delay in self.DELAYS_S:
                time.sleep(delay)
                if self._poked.is_set():
                    break  # more deletes: start the sequence again
                try:
                    btrfs.sync(self._root)
                except OSError as e:  # the pool is gone (shutdown, tests): nothing to free
                    log.debug("btrfs sync of %s failed: %s", self._root, e)
                    break


class SubvolumeLayout:
    kind = "subvolumes"
    DATA = "data.img"

    def __init__(self, root: str):
        self.root = root
        self.volumes_dir = os.path.join(root, VOLUMES_DIR)
        self.snapshots_dir = os.path.join(root, SNAPSHOTS_DIR)
        self._reclaim = _Reclaimer(root)

    def setup(self) -> None:
        permissions.private_dir(self.volumes_dir)
        permissions.private_dir(self.snapshots_dir)

    def volume_path(self, name: str) -> str:
        return os.path.join(self.volumes_dir, check_name(name), self.DATA)

    def snapshot_path(self, name: str) -> str:
        return os.path.join(self.snapshots_dir, check_name(name), self.DATA)

    def create_volume(self, name: str, size_bytes: int) -> None:
        check_name(name)
        subvol = os.path.join(self.volumes_dir, name)
        try:
            btrfs.create_subvolume(self.volumes_dir, name)
        except FileExistsError:
            raise AlreadyExists(f"{subvol} exists") from None
        except OSError as e:
            raise _space_error(e) from None
        try:
            # a new subvolume's root is 0755; snapshots and clones of it keep its mode
            os.chmod(subvol, permissions.PRIVATE_DIR)
            fileops.set_nocow(subvol)  # inherited by the data file made next
            fd = os.open(os.path.join(subvol, self.DATA), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            try:
                # Not forced to disk: an fsync in a new subvolume commits a whole btrfs
                # transaction (milliseconds). See VolumeFiles.reconcile.
                os.ftruncate(fd, size_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            self.delete_volume(name)
            raise _space_error(e) from None

    def _snapshot(self, source_dir: str, parent: str, name: str, read_only: bool) -> None:
        check_name(name)
        if not btrfs.is_subvolume(source_dir):
            raise NotFound(f"{source_dir} is missing")
        try:
            btrfs.snapshot(source_dir, parent, name, read_only=read_only)
        except FileExistsError:
            raise AlreadyExists(f"{parent}/{name} exists") from None
        except OSError as e:
            raise _space_error(e) from None

    def clone_volume(self, source: str, name: str) -> None:
        self._snapshot(os.path.join(self.volumes_dir, check_name(source)), self.volumes_dir,
                       name, False)

    def snapshot_volume(self, volume: str, name: str) -> None:
        self._snapshot(os.path.join(self.volumes_dir, check_name(volume)), self.snapshots_dir,
                       name, True)

    def restore_snapshot(self, snapshot: str, name: str) -> None:
        self._snapshot(os.path.join(self.snapshots_dir, check_name(snapshot)),
                       self.volumes_dir, name, False)

    def _delete(self, parent: str, name: str) -> None:
        path = os.path.join(parent, check_name(name))
        if btrfs.is_subvolume(path):
            btrfs.delete_subvolume(parent, name)
            self._reclaim.poke()
        elif os.path.isdir(path):  # a create cut short before the subvolume existed
            shutil.rmtree(path)

    def delete_volume(self, name: str) -> None:
        self._delete(self.volumes_dir, name)

    def delete_snapshot(self, name: str) -> None:
        self._delete(self.snapshots_dir, name)

    @staticmethod
    def _names(directory: str) -> list[str]:
        return sorted(n for n in os.listdir(directory) if _NAME.match(n))

    def volumes(self) -> list[str]:
        return self._names(self.volumes_dir)

    def snapshots(self) -> list[str]:
        return self._names(self.snapshots_dir)
