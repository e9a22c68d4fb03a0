"""Node-side life of a volume: stage, publish, unpublish, unstage, expand, measure.

Each step converges on the kernel's state (loop devices by backing file, mounts from
/proc/self/mountinfo), so a retry after a timeout or a crash neither stacks mounts nor
leaks devices. Records (kinds "stage" and "publish") are written before the first side
effect and marked done after, so `reconcile()` can roll back what a crash cut short
while leaving finished work, used by running pods, untouched.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from engine import crash, filesystem
from engine.errors import AlreadyExists, InUse, InvalidSpec, NotFound
from engine.loopdev import LoopDevice, LoopDevices
from engine.mounts import MountEntry, Mounts
from engine.state import Store
from engine.volumes import Backing, VolumeFiles

log = logging.getLogger(__name__)

STAGE, PUBLISH = "stage", "publish"
PENDING, DONE = "pending", "done"
MOUNT, BLOCK = "mount", "block"


@dataclass(frozen=True)
class StageRequest:
    volume_id: str
    staging_path: str
    access_type: str  # MOUNT or BLOCK
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    read_only: bool = False  # reader-only access modes mount the filesystem ro


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    staging_path: str
    target_path: str
    access_type: str
    read_only: bool
    mount_flags: tuple[str, ...] = ()
    single_writer: bool = False  # SINGLE_NODE_SINGLE_WRITER: one target at a time
    pod_uid: str = ""


@dataclass(frozen=True)
class VolumeStats:
    block: bool  # a block volume has bytes (its size) and no inodes
    usage: filesystem.FsUsage
    abnormal: bool
    message: str


def _publish_key(volume_id: str, target: str) -> str:
    return f"{volume_id}|{os.path.normpath(target)}"


def _check_mount_option(option: str) -> str:
    if not option or "," in option or "\0" in option:
        raise InvalidSpec(f"bad mount flag {option!r}")
    return option


class NodeVolumes:
    def __init__(self, store: Store, files: VolumeFiles, loops: LoopDevices, mounts: Mounts):
        self.store = store
        self.files = files
        self.loops = loops
        self.mounts = mounts

    # --- helpers -----------------------------------------------------------------
    def _rw_device(self, backing: Backing) -> LoopDevice | None:
        for dev in self.loops.by_backing_file(self.files.path(backing)):
            if not dev.read_only:
                return dev
        return None

    def device_of(self, backing: Backing) -> LoopDevice | None:
        """The volume's read-write loop device, if the kernel has one."""
        return self._rw_device(backing)

    def _ensure_rw_device(self, backing: Backing) -> LoopDevice:
        dev = self._rw_device(backing)
        if dev is None:
            dev = self.loops.attach(
                self.files.path(backing), sector_size_bytes=backing.sector_size_bytes,
                strict_direct_io=False,
            )
        elif dev.size_bytes != backing.size_bytes:
            dev = self.loops.refresh_capacity(dev.path)  # expanded before staging
        return dev

    def _mount_of(self, target: str) -> MountEntry | None:
        stack = self.mounts.at(target)
        return stack[-1] if stack else None

    def _is_device_bind(self, entry: MountEntry, dev: LoopDevice) -> bool:
        return entry.root == f"/{dev.name}" or entry.source == dev.path

    def stage_record(self, volume_id: str) -> dict | None:
        return self.store.get(STAGE, volume_id)

    def publishes(self, volume_id: str) -> list[dict]:
        return [r for _, r in self.store.list(PUBLISH, prefix=f"{volume_id}|")]

    # --- stage / unstage -----------------------------------------------------------
    def stage(self, req: StageRequest) -> None:
        backing = self.files.require(req.volume_id)
        fs_type = filesystem.check_fs_type(req.fs_type) if req.access_type == MOUNT else ""
        flags = [_check_mount_option(o) for o in req.mount_flags]
        staging = os.path.normpath(req.staging_path)
        rec = self.store.get(STAGE, req.volume_id)
        if rec is not None:
            if rec["staging_path"] != staging:
                raise InUse(f"volume {req.volume_id} is staged at {rec['staging_path']}")
            if rec["access_type"] != req.access_type or rec.get("fs_type", "") != fs_type:
                raise AlreadyExists(
                    f"volume {req.volume_id} is staged at {staging} as "
                    f"{rec['access_type']} {rec.get('fs_type', '')}"
                )
        self.store.put(STAGE, req.volume_id, {
            "staging_path": staging, "access_type": req.access_type, "fs_type": fs_type,
            "read_only": req.read_only, "state": rec["state"] if rec else PENDING,
        })
        crash.point("stage-after-intent")
        dev = self._ensure_rw_device(backing)
        crash.point("stage-after-attach")
        if req.access_type == MOUNT:
            self._stage_filesystem(dev, staging, fs_type, flags, req.read_only)
        crash.point("stage-after-mount")
        self.store.put(STAGE, req.volume_id, {
            "staging_path": staging, "access_type": req.access_type, "fs_type": fs_type,
            "read_only": req.read_only, "state": DONE,
        })

    def _stage_filesystem(
        self, dev: LoopDevice, staging: str, fs_type: str, flags: list[str], read_only: bool
    ) -> None:
        current = self._mount_of(staging)
        if current is not None:
            if (current.major, current.minor) != (dev.major, dev.minor):
                raise AlreadyExists(f"{staging} already has another filesystem mounted")
            return
        os.makedirs(staging, exist_ok=True)
        found = filesystem.detect(dev.path)
        if found is None:
            filesystem.make(dev.path, fs_type)
        elif found != fs_type:
            raise AlreadyExists(f"volume holds {found}, not the {fs_type} asked for")
        opts = list(flags) + (["ro"] if read_only else [])
        self.mounts.mount(dev.path, staging, fs_type, opts)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging = os.path.normpath(staging_path)
        rec = self.store.get(STAGE, volume_id)
        if rec is not None and rec["staging_path"] != staging:
            return  # staged elsewhere: nothing is staged at this path
        if self.publishes(volume_id):
            raise InUse(f"volume {volume_id} is still published; unpublish it first")
        backing = self.files.get(volume_id)
        dev = self._rw_device(backing) if backing else None
        entry = self._mount_of(staging)
        # only our own filesystem comes off: another volume may be staged at this path
        if entry is not None and dev is not None and (entry.major, entry.minor) == (
                dev.major, dev.minor):
            self.mounts.unmount(staging)
        crash.point("unstage-after-unmount")
        if dev is not None:
            if self.mounts.of_device(dev.major, dev.minor):
                raise InUse(f"{dev.path} of volume {volume_id} is still mounted elsewhere")
            self.loops.detach(dev.path)
        self.store.delete(STAGE, volume_id)

    # --- publish / unpublish -------------------------------------------------------
    def publish(self, req: PublishRequest) -> LoopDevice:
        """Publish; returns the device the pod does its I/O on (for its QoS rules)."""
        backing = self.files.require(req.volume_id)
        stage = self.store.get(STAGE, req.volume_id)
        staging = os.path.normpath(req.staging_path)
        if stage is None or stage["state"] != DONE or stage["staging_path"] != staging:
            raise InUse(f"volume {req.volume_id} is not staged at {staging}")
        if stage["access_type"] != req.access_type:
            raise AlreadyExists(f"volume {req.volume_id} is staged as {stage['access_type']}")
        target = os.path.normpath(req.target_path)
        key = _publish_key(req.volume_id, target)
        rec = self.store.get(PUBLISH, key)
        if rec is not None and (rec["read_only"] != req.read_only
                                or rec["access_type"] != req.access_type):
            raise AlreadyExists(f"volume {req.volume_id} is published at {target} differently")
        if req.single_writer and not req.read_only:
            others = [p for p in self.publishes(req.volume_id)
                      if p["target"] != target and not p["read_only"]]
            if others:
                raise InUse(
                    f"volume {req.volume_id} is single-writer and already published "
                    f"at {others[0]['target']}"
                )
        flags = [_check_mount_option(o) for o in req.mount_flags]
        ro_device = rec.get("ro_device", "") if rec else ""
        record = {
            "volume_id": req.volume_id, "target": target, "access_type": req.access_type,
            "read_only": req.read_only, "ro_device": ro_device, "pod_uid": req.pod_uid,
            "state": rec["state"] if rec else PENDING,
        }
        self.store.put(PUBLISH, key, record)
        crash.point("publish-after-intent")
        if req.access_type == BLOCK:
            dev = self._publish_block(backing, target, req.read_only, ro_device)
            record["ro_device"] = dev.path if req.read_only else ""
        else:
            dev = self._publish_mount(backing, staging, target, req.read_only, flags)
        crash.point("publish-after-mount")
        record["device"] = f"{dev.major}:{dev.minor}"
        record["state"] = DONE
        self.store.put(PUBLISH, key, record)
        return dev

    def _publish_mount(
        self, backing: Backing, staging: str, target: str, read_only: bool, flags: list[str]
    ) -> LoopDevice:
        dev = self._rw_device(backing)
        if dev is None:
            raise NotFound(f"volume {backing.volume_id} lost its device; stage it again")
        current = self._mount_of(target)
        if current is not None:
            if (current.major, current.minor) != (dev.major, dev.minor):
                raise AlreadyExists(f"{target} has another filesystem mounted")
            if current.read_only != read_only:
                raise AlreadyExists(f"{target} is mounted with another read-only flag")
            return dev
        os.makedirs(target, exist_ok=True)
        self.mounts.bind(staging, target, read_only=read_only, options=flags)
        return dev

    def _publish_block(
        self, backing: Backing, target: str, read_only: bool, ro_device: str
    ) -> LoopDevice:
        if read_only:
            # A read-only bind of a device node does not stop writes through it:
            # give the pod a loop device the kernel itself makes read-only.
            dev = self.loops.by_path(ro_device) if ro_device else None
            if dev is None or dev.backing_file != self.files.path(backing):
                dev = self.loops.attach(
                    self.files.path(backing), read_only=True,
                    sector_size_bytes=backing.sector_size_bytes, strict_direct_io=False,
                )
        else:
            dev = self._rw_device(backing)
            if dev is None:
                raise NotFound(f"volume {backing.volume_id} lost its device; stage it again")
        current = self._mount_of(target)
        if current is not None:
            if not self._is_device_bind(current, dev):
                raise AlreadyExists(f"{target} already has something else mounted")
            return dev
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if os.path.isdir(target):
            os.rmdir(target)  # only an empty directory: a block target must be a file
        if not os.path.exists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        self.mounts.bind(dev.path, target, read_only=read_only)
        return dev

    def publish_record(self, volume_id: str, target_path: str) -> dict | None:
        return self.store.get(PUBLISH, _publish_key(volume_id, os.path.normpath(target_path)))

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = os.path.normpath(target_path)
        key = _publish_key(volume_id, target)
        rec = self.store.get(PUBLISH, key)
        backing = self.files.get(volume_id)
        entry = self._mount_of(target)
        if entry is not None:
            if rec is None and not self._mount_is_ours(entry, backing):
                # another volume is published here: nothing of this one to undo
                self.store.delete(PUBLISH, key)
                return
            self.mounts.unmount(target)
        crash.point("unpublish-after-unmount")
        _remove_target(target)
        if rec is not None and rec.get("ro_device"):
            dev = self.loops.by_path(rec["ro_device"])
            if dev is not None and backing is not None \
                    and dev.backing_file == self.files.path(backing):
                self.loops.detach(dev.path)
        self.store.delete(PUBLISH, key)

    def _mount_is_ours(self, entry: MountEntry, backing: Backing | None) -> bool:
        if backing is None:
            return False
        return any(
            (entry.major, entry.minor) == (d.major, d.minor) or self._is_device_bind(entry, d)
            for d in self.loops.by_backing_file(self.files.path(backing))
        )

    def flush(self, volume_id: str) -> None:
        """Flush the volume's staged device, so a buffered loop's cache reaches its file."""
        backing = self.files.get(volume_id)
        dev = self._rw_device(backing) if backing else None
        if dev is None:
            return
        fd = os.open(dev.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- expand and measure --------------------------------------------------------
    def expand(self, volume_id: str, volume_path: str) -> int:
        """Grow devices (and the filesystem) to the backing file's size; returns bytes."""
        backing = self.files.require(volume_id)
        stage = self.store.get(STAGE, volume_id)
        if stage is None:
            raise InUse(f"volume {volume_id} is not staged on this node")
        path = os.path.normpath(volume_path)
        known = {stage["staging_path"]} | {p["target"] for p in self.publishes(volume_id)}
        if path not in known:
            raise NotFound(f"{volume_path} is not a path of volume {volume_id}")
        for dev in self.loops.by_backing_file(self.files.path(backing)):
            if dev.size_bytes != backing.size_bytes:
                self.loops.refresh_capacity(dev.path)
        rw = self._rw_device(backing)
        if stage["access_type"] == MOUNT and rw is not None:
            filesystem.grow(stage["fs_type"], rw.path, stage["staging_path"])
        return backing.size_bytes

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        backing = self.files.require(volume_id)
        path = os.path.normpath(volume_path)
        stage = self.store.get(STAGE, volume_id)
        known = set()
        if stage is not None:
            known.add(stage["staging_path"])
        known |= {p["target"] for p in self.publishes(volume_id)}
        if path not in known or not os.path.exists(path):
            raise NotFound(f"{volume_path} is not a path of volume {volume_id}")
        problem = ""
        if not os.path.exists(self.files.path(backing)):
            problem = "the volume's backing file is missing from the pool"
        elif stage is not None and self._rw_device(backing) is None:
            problem = "the volume's loop device is gone; stage it again"
        block = stage is not None and stage["access_type"] == BLOCK
        if block or stat.S_ISBLK(os.stat(path).st_mode):
            size = backing.size_bytes
            dev = self._rw_device(backing)
            if dev is not None:
                size = dev.size_bytes
            usage = filesystem.FsUsage(size, 0, 0, 0, 0, 0)
            return VolumeStats(True, usage, bool(problem), problem)
        return VolumeStats(False, filesystem.usage(path), bool(problem), problem)

    # --- restart -------------------------------------------------------------------
    def reconcile(self) -> None:
        """Roll back half-done stage/publish steps; detach loop devices nobody owns."""
        for key, rec in self.store.list(PUBLISH):
            if rec["state"] == PENDING:
                log.warning("rolling back interrupted publish of %s", key)
                self.unpublish(rec["volume_id"], rec["target"])
        for volume_id, rec in self.store.list(STAGE):
            if rec["state"] == PENDING and not self.publishes(volume_id):
                log.warning("rolling back interrupted stage of %s", volume_id)
                self.unstage(volume_id, rec["staging_path"])
        owned: dict[str, str] = {}
        for backing in self.files.all():
            owned[self.files.path(backing)] = backing.volume_id
        pool_dir = self.files.pool.volumes_dir + os.sep
        for dev in self.loops.all():
            if not dev.backing_file.startswith(pool_dir):
                continue
            owner = owned.get(dev.backing_file)
            in_use = self.mounts.of_device(dev.major, dev.minor) or any(
                self._is_device_bind(m, dev) for m in self.mounts.table()
            )
            if in_use:
                continue
            staged = owner is not None and self.store.get(STAGE, owner) is not None
            if staged and not dev.read_only:
                continue  # a staged block volume: its device is its state
            log.warning("detaching %s (%s): no record uses it", dev.path, dev.backing_file)
            self.loops.detach(dev.path)


def _remove_target(target: str) -> None:
    """Remove a publish target after unmounting: the CO expects it gone."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(target)  # refuses a non-empty directory: never delete data
    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(target)
