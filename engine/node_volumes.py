"""Node-side life of a volume: stage, publish, unpublish, unstage, expand, measure.

Each step converges on the kernel's state (the backend's devices: loop devices by their
backing file's device and inode, NVMe namespaces by subsystem and NSID; mounts from
/proc/self/mountinfo), so a retry after a timeout, a crash, a
restart in a new mount namespace or a reboot neither stacks mounts nor leaks devices.
Records (engine/node_records.py: stage and publish) are written before the first side
effect and marked done after, so `reconcile()` can roll back what a crash cut short while
leaving finished work, used by running pods, untouched. A call that fails rolls back what
it did itself (engine/rollback.py): the volume stays as it was, usable.

Data is never destroyed: a stage refuses an access type the volume was not created for,
and never formats a device that carries a signature, or data Tandem did not put there
by formatting it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, replace

from engine import crash, fileops, filesystem
from engine.access import BLOCK, MOUNT, check_fs_type
from engine.backend import Backend, Device, DeviceView
from engine.errors import AlreadyExists, InUse, InvalidSpec, NotFound, Precondition
from engine.mounts import MountEntry, Mounts, is_device_bind, mounts_device
from engine.node_records import DONE, PENDING, NodeRecords, PublishRecord, StageRecord
from engine.rollback import Rollback
from engine.state import Store
from engine.volumes import Backing

log = logging.getLogger(__name__)



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
class Condition:
    abnormal: bool
    message: str


HEALTHY = Condition(False, "")


@dataclass(frozen=True)
class VolumeStats:
    block: bool  # a block volume has bytes (its size) and no inodes
    usage: filesystem.FsUsage
    abnormal: bool
    message: str


def _check_mount_option(option: str) -> str:
    if not option or "," in option or "\0" in option:
        raise InvalidSpec(f"bad mount flag {option!r}")
    return option


class KernelView:
    """One reading of the kernel's mount table and of the backend's devices, for many
    questions (ListVolumes asks about every volume)."""

    def __init__(self, backend: Backend, mounts: Mounts):
        self.backend = backend
        self.mounts = mounts
        self._table: list[MountEntry] | None = None  # read on first use
        self._devices: DeviceView | None = None

    @property
    def table(self) -> list[MountEntry]:
        if self._table is None:
            self._table = self.mounts.table()
        return self._table

    def devices_of(self, backing: Backing) -> list[Device]:
        if self._devices is None:
            self._devices = self.backend.device_view()
        return self._devices.devices_of(backing)

    def mount_at(self, target: str) -> MountEntry | None:
        stack = [m for m in self.table if m.target == target]
        return stack[-1] if stack else None


_is_device_bind = is_device_bind
_mounts_device = mounts_device


class NodeVolumes:
    def __init__(self, store: Store, files: Backend, mounts: Mounts):
        self.records = NodeRecords(store)
        self.files = files  # the backend: records and devices of the volumes' storage
        self.mounts = mounts

    # --- helpers -----------------------------------------------------------------
    def _rw_device(self, backing: Backing) -> Device | None:
        for dev in self.files.devices(backing):
            if not dev.read_only:
                return dev
        return None

    def _ensure_rw_device(self, backing: Backing, undo: Rollback) -> Device:
        dev = self._rw_device(backing)
        if dev is None:
            dev = self.files.attach(backing)
            undo.add(f"attaching {dev.path}", self.files.release, backing, dev)
        else:
            dev = self.files.refreshed(backing, dev)  # expanded before staging
        return dev

    def _mount_of(self, target: str) -> MountEntry | None:
        stack = self.mounts.at(target)
        return stack[-1] if stack else None

    def stage_record(self, volume_id: str) -> StageRecord | None:
        return self.records.get_stage(volume_id)

    def publishes(self, volume_id: str) -> list[PublishRecord]:
        return self.records.publishes_of(volume_id)

    def kernel_view(self) -> KernelView:
        return KernelView(self.files, self.mounts)

    def mounted_staging_path(self, volume_id: str) -> str:
        """The staging path if the kernel shows the volume's filesystem mounted there, else
        '' (after a reboot the record says staged and nothing is mounted: freezing that
        directory would freeze the filesystem under it)."""
        rec = self.stage_record(volume_id)
        backing = self.files.get(volume_id)
        if rec is None or rec.access_type != MOUNT or backing is None:
            return ""
        dev = self._rw_device(backing)
        entry = self._mount_of(rec.staging_path)
        return rec.staging_path if dev is not None and _mounts_device(entry, dev) else ""

    # --- stage / unstage -----------------------------------------------------------
    def stage(self, req: StageRequest) -> None:
        backing = self.files.require(req.volume_id)
        if backing.role == "replica":  # its writes must reach every replica
            raise Precondition(f"this node holds only a replica of mirrored volume "
                               f"{req.volume_id}: it is staged through its frontend (the "
                               "CO passes the volume's context and the attach's)")
        _check_access_type(backing, req.access_type)
        fs_type = check_fs_type(req.fs_type) if req.access_type == MOUNT else ""
        if fs_type:
            filesystem.check_size(fs_type, backing.size_bytes)
        flags = [_check_mount_option(o) for o in req.mount_flags]
        staging = os.path.normpath(req.staging_path)
        rec = self.records.get_stage(req.volume_id)
        if rec is not None and not rec.done:
            # an earlier attempt was cut short and not rolled back: finish rolling it back
            self.unstage(req.volume_id, rec.staging_path)
            rec = None
        if rec is not None:
            if rec.staging_path != staging:
                raise InUse(f"volume {req.volume_id} is staged at {rec.staging_path}")
            if rec.access_type != req.access_type or rec.fs_type != fs_type:
                raise AlreadyExists(
                    f"volume {req.volume_id} is staged at {staging} as "
                    f"{rec.access_type} {rec.fs_type}"
                )
        _check_directory(staging, "staging path")
        record = StageRecord(
            volume_id=req.volume_id, staging_path=staging, access_type=req.access_type,
            fs_type=fs_type, mount_flags=tuple(flags), read_only=req.read_only,
            state=rec.state if rec else PENDING,
        )
        with Rollback() as undo:
            if rec is None:
                self.records.put_stage(record)
                undo.add("the stage record", self.records.delete_stage, req.volume_id)
            crash.point("stage-after-intent")
            dev = self._ensure_rw_device(backing, undo)
            crash.point("stage-after-attach")
            if req.access_type == MOUNT:
                self._stage_filesystem(backing, dev, staging, fs_type, flags, req.read_only,
                                       undo)
            crash.point("stage-after-mount")
            self.records.put_stage(replace(record, state=DONE))

    def _stage_filesystem(self, backing: Backing, dev: Device, staging: str, fs_type: str,
                          flags: list[str], read_only: bool, undo: Rollback) -> None:
        current = self._mount_of(staging)
        if current is not None:
            if not _mounts_device(current, dev):
                raise AlreadyExists(f"{staging} already has another filesystem mounted")
            return
        _make_directories(staging, undo)
        self._ensure_filesystem(backing, dev, fs_type)
        crash.point("stage-after-mkfs")
        opts = list(flags) + (["ro"] if read_only else [])
        self.mounts.mount(dev.path, staging, fs_type, opts)
        undo.add(f"mounting {staging}", self.mounts.unmount, staging)

    def _ensure_filesystem(self, backing: Backing, dev: Device, fs_type: str) -> None:
        """Make fs_type on the device unless it has it; never format over anything else.

        The kubelet's safe-format-and-mount only looks for signatures and would format a
        block volume's raw data: here a device is formatted only when blkid finds no
        signature at all and the backing file holds no data, or only data of a mkfs of
        Tandem's own that was cut short.
        """
        vid = backing.volume_id
        found = filesystem.probe(dev.path)
        if found is not None:
            if found.is_filesystem and found.type == fs_type:
                # expanded while unstaged: grow it now, before the mount
                filesystem.grow_unmounted(
                    fs_type, dev.path, self.files.filesystem_bytes(backing) or dev.size_bytes)
                return
            if found.is_filesystem:
                raise Precondition(f"volume {vid} holds a {found.type} filesystem, not the "
                                   f"{fs_type} asked for; it is never reformatted")
            raise Precondition(f"volume {vid} carries a {found.type} signature "
                               f"({found.usage}); refusing to format it")
        ours = backing.made_fs and not backing.made_fs_done  # our own mkfs, cut short
        if not ours and self._holds_data(backing, dev):
            why = ("the filesystem Tandem made on it is gone" if backing.made_fs
                   else "it was written without a filesystem (as a block device?)")
            raise Precondition(f"volume {vid} holds data but no filesystem signature: {why}; "
                               "refusing to format it")
        self.files.set_made_fs(vid, fs_type, done=False)
        crash.point("stage-format-started")
        filesystem.make(dev.path, fs_type, size_bytes=self.files.filesystem_bytes(backing))
        self.files.set_made_fs(vid, fs_type, done=True)

    def _holds_data(self, backing: Backing, dev: Device) -> bool:
        return self.files.holds_data(backing, dev)

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging = os.path.normpath(staging_path)
        rec = self.records.get_stage(volume_id)
        if rec is not None and rec.staging_path != staging:
            return  # staged elsewhere: nothing is staged at this path
        if self.publishes(volume_id):
            raise InUse(f"volume {volume_id} is still published; unpublish it first")
        backing = self.files.get(volume_id)
        devs = [d for d in self.files.devices(backing) if not d.read_only] if backing else []
        entry = self._mount_of(staging)
        # only our own filesystem comes off: another volume may be staged at this path
        if any(_mounts_device(entry, d) for d in devs):
            self.mounts.unmount(staging)
        crash.point("unstage-after-unmount")
        for dev in devs:
            if self.mounts.of_device(dev.major, dev.minor):
                raise InUse(f"{dev.path} of volume {volume_id} is still mounted elsewhere")
            assert backing is not None
            self.files.release(backing, dev, require_released=True)
        self.records.delete_stage(volume_id)

    # --- publish / unpublish -------------------------------------------------------
    def publish(self, req: PublishRequest) -> Device:
        """Publish; returns the device the pod does its I/O on (for its QoS rules)."""
        backing = self.files.require(req.volume_id)
        stage = self.records.get_stage(req.volume_id)
        staging = os.path.normpath(req.staging_path)
        if stage is None or not stage.done or stage.staging_path != staging:
            raise InUse(f"volume {req.volume_id} is not staged at {staging}")
        if stage.access_type != req.access_type:
            raise AlreadyExists(f"volume {req.volume_id} is staged as {stage.access_type}")
        target = os.path.normpath(req.target_path)
        rec = self.records.get_publish(req.volume_id, target)
        if rec is not None and (rec.read_only != req.read_only
                                or rec.access_type != req.access_type):
            raise AlreadyExists(f"volume {req.volume_id} is published at {target} differently")
        if req.single_writer and not req.read_only:
            others = [p for p in self.publishes(req.volume_id)
                      if p.target != target and not p.read_only]
            if others:
                raise InUse(
                    f"volume {req.volume_id} is single-writer and already published "
                    f"at {others[0].target}"
                )
        flags = [_check_mount_option(o) for o in req.mount_flags]
        if req.access_type == BLOCK:
            _check_block_target(target)
        else:
            _check_directory(target, "target path")
        ro_device = rec.ro_device if rec else ""
        # a retry keeps what the record knew; the pod is the one asking now
        record = PublishRecord(
            volume_id=req.volume_id, target=target, access_type=req.access_type,
            read_only=req.read_only, ro_device=ro_device, pod_uid=req.pod_uid,
            state=rec.state if rec else PENDING,
        )
        with Rollback() as undo:
            if rec is None:
                self.records.put_publish(record)
                undo.add("the publish record", self.records.delete_publish, req.volume_id,
                         target)
            crash.point("publish-after-intent")
            rw = self._restore_stage(backing, stage, undo)
            if req.access_type == BLOCK:
                dev = self._publish_block(backing, rw, target, req.read_only, ro_device, undo)
                record = replace(record, ro_device=dev.path if req.read_only else "")
            else:
                dev = self._publish_mount(rw, staging, target, req.read_only, flags, undo)
            crash.point("publish-after-mount")
            self.records.put_publish(replace(record, device=(dev.major, dev.minor),
                                             state=DONE))
        return dev

    def _restore_stage(self, backing: Backing, stage: StageRecord,
                       undo: Rollback) -> Device:
        """The staged device (and filesystem), brought back if a reboot took them."""
        dev = self._ensure_rw_device(backing, undo)
        if stage.access_type == MOUNT:
            self._stage_filesystem(backing, dev, stage.staging_path, stage.fs_type,
                                   list(stage.mount_flags), stage.read_only, undo)
        return dev

    def _publish_mount(self, dev: Device, staging: str, target: str, read_only: bool,
                       flags: list[str], undo: Rollback) -> Device:
        current = self._mount_of(target)
        if current is not None:
            if not _mounts_device(current, dev):
                raise AlreadyExists(f"{target} has another filesystem mounted")
            if current.read_only != read_only:
                raise AlreadyExists(f"{target} is mounted with another read-only flag")
            return dev
        _make_directories(target, undo)
        self.mounts.bind(staging, target, read_only=read_only, options=flags)
        undo.add(f"mounting {target}", self.mounts.unmount, target)
        return dev

    def _publish_block(self, backing: Backing, rw: Device, target: str, read_only: bool,
                       ro_device: str, undo: Rollback) -> Device:
        dev = rw
        if read_only:
            # A read-only bind of a device node does not stop writes through it:
            # give the pod a device the kernel itself makes read-only.
            found = self.files.device_at(ro_device) if ro_device else None
            if found is not None and found.read_only and self.files.still_holds(backing, found):
                dev = found
            else:
                dev = self.files.attach(backing, read_only=True)
                undo.add(f"attaching {dev.path}", self.files.release, backing, dev)
        current = self._mount_of(target)
        if current is not None:
            if not _is_device_bind(current, dev):
                raise AlreadyExists(f"{target} already has something else mounted")
            return dev
        _make_directories(os.path.dirname(target), undo)
        if os.path.isdir(target):
            os.rmdir(target)  # only an empty directory (checked): a block target is a file
            undo.add(f"removing the directory {target}", os.mkdir, target)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            undo.add(f"creating {target}", os.unlink, target)
        self.mounts.bind(dev.path, target, read_only=read_only)
        undo.add(f"mounting {target}", self.mounts.unmount, target)
        return dev

    def publish_record(self, volume_id: str, target_path: str) -> PublishRecord | None:
        return self.records.get_publish(volume_id, target_path)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = os.path.normpath(target_path)
        rec = self.records.get_publish(volume_id, target)
        backing = self.files.get(volume_id)
        entry = self._mount_of(target)
        if entry is not None:
            if rec is None and not self._mount_is_ours(entry, backing):
                # another volume is published here: nothing of this one to undo
                return
            self.mounts.unmount(target)
        crash.point("unpublish-after-unmount")
        _remove_target(target)
        if rec is not None and rec.ro_device and backing is not None:
            dev = self.files.device_at(rec.ro_device)
            if dev is not None and dev.read_only and self.files.still_holds(backing, dev):
                self.files.release(backing, dev, require_released=True)
        self.records.delete_publish(volume_id, target)

    def _mount_is_ours(self, entry: MountEntry, backing: Backing | None) -> bool:
        if backing is None:
            return False
        return any(
            _mounts_device(entry, d) or _is_device_bind(entry, d)
            for d in self.files.devices(backing)
        )

    def flush(self, volume_id: str) -> None:
        """Flush the volume's staged device, so a buffered loop's cache reaches its file."""
        backing = self.files.get(volume_id)
        dev = self._rw_device(backing) if backing else None
        if dev is not None:
            fileops.fsync_path(dev.path)

    # --- expand and measure --------------------------------------------------------
    def expand(self, volume_id: str, volume_path: str) -> int:
        """Grow devices (and the filesystem) to the backing file's size; returns bytes."""
        backing = self.files.require(volume_id)
        stage = self.records.get_stage(volume_id)
        if stage is None:
            raise InUse(f"volume {volume_id} is not staged on this node")
        path = _canonical(volume_path)
        known = {stage.staging_path} | {p.target for p in self.publishes(volume_id)}
        if path not in known:
            raise NotFound(f"{volume_path} is not a path of volume {volume_id}")
        for dev in self.files.devices(backing):
            self.files.refreshed(backing, dev)
        backing = self.files.require(volume_id)  # a mirrored volume learns its size just now
        rw = self._rw_device(backing)
        if stage.access_type == MOUNT and rw is not None:
            filesystem.grow(stage.fs_type, rw.path, stage.staging_path,
                            size_bytes=self.files.filesystem_bytes(backing))
        return backing.size_bytes

    def condition(self, volume_id: str, view: KernelView | None = None) -> Condition:
        """The volume's health on this node, from the kernel's state: records say what
        should be there (a device, mounts), the kernel says what is."""
        backing = self.files.get(volume_id)
        if backing is None:
            return Condition(True, "the volume's storage has no record on this node")
        missing = self.files.storage_missing(backing)
        if missing:
            return Condition(True, missing)
        stage = self.stage_record(volume_id)
        if stage is None or not stage.done:
            return HEALTHY
        view = view or self.kernel_view()
        devs = view.devices_of(backing)
        rw = next((d for d in devs if not d.read_only), None)
        staging = stage.staging_path
        if rw is None:
            return Condition(True, f"staged at {staging}, but its {self.files.kind} device is "
                                   "gone (a reboot, or a detach behind the driver's back); "
                                   "stage it again")
        if stage.access_type == MOUNT and not _mounts_device(view.mount_at(staging), rw):
            return Condition(True, f"staged at {staging}, but its filesystem is not mounted "
                                   "there; stage it again")
        for pub in self.publishes(volume_id):
            if not pub.done:
                continue
            entry = view.mount_at(pub.target)
            if entry is None or not (_mounts_device(entry, rw)
                                     or any(_is_device_bind(entry, d) for d in devs)):
                return Condition(True, f"published at {pub.target}, but not mounted there; "
                                       "publish it again")
        return HEALTHY

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        backing = self.files.require(volume_id)
        path = _canonical(volume_path)
        stage = self.records.get_stage(volume_id)
        known = set()
        if stage is not None:
            known.add(stage.staging_path)
        known |= {p.target for p in self.publishes(volume_id)}
        if path not in known or not os.path.exists(path):
            raise NotFound(f"{volume_path} is not a path of volume {volume_id}")
        cond = self.condition(volume_id)
        block = stage is not None and stage.access_type == BLOCK
        if block or stat.S_ISBLK(os.stat(path).st_mode):
            size = backing.size_bytes
            dev = self._rw_device(backing)
            if dev is not None:
                size = dev.size_bytes
            usage = filesystem.FsUsage(size, 0, 0, 0, 0, 0)
            return VolumeStats(True, usage, cond.abnormal, cond.message)
        return VolumeStats(False, filesystem.usage(path), cond.abnormal, cond.message)

    # --- restart -------------------------------------------------------------------
    def reconcile(self) -> None:
        """Roll back half-done stage/publish steps; detach loop devices nobody owns."""
        for pub in self.records.list_publishes():
            if pub.state is PENDING:
                log.warning("rolling back interrupted publish of %s at %s", pub.volume_id,
                            pub.target)
                self._try(self.unpublish, pub.volume_id, pub.target)
        for stage in self.records.list_stages():
            if stage.state is PENDING and not self.publishes(stage.volume_id):
                log.warning("rolling back interrupted stage of %s", stage.volume_id)
                self._try(self.unstage, stage.volume_id, stage.staging_path)
        self.files.release_unowned(self.records, self.mounts.table())

    @staticmethod
    def _try(step, *args) -> None:
        """A roll-back that fails at start-up is logged, not fatal: its record stays, so the
        CO's retry (or the next start) finishes it; the driver must come up meanwhile."""
        try:
            step(*args)
        except Exception:  # noqa: BLE001
            log.exception("rolling back %s failed; it stays recorded", args)


def _check_access_type(backing: Backing, access_type: str) -> None:
    """The volume is used the way it was created for (when that is known)."""
    if backing.access_types and access_type not in backing.access_types:
        made = " and ".join(backing.access_types)
        harm = " (that would format it)" if access_type == MOUNT else ""
        raise Precondition(f"volume {backing.volume_id} was created for {made} access; "
                           f"refusing to stage it for {access_type} access{harm}")


def _canonical(path: str) -> str:
    """Where a path really leads (a relative path leads nowhere of ours)."""
    return os.path.realpath(path) if os.path.isabs(path) else path


def _check_directory(path: str, what: str) -> None:
    """A place for a directory: a directory already, or nothing yet."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise Precondition(f"{what} {path}: a parent of it is not a directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Precondition(f"{what} {path} exists and is not a directory")


def _check_block_target(target: str) -> None:
    """A place for a block volume's device file: a file, an empty directory (the CO may
    have made one), or nothing yet."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return _check_directory(os.path.dirname(target), "the target's parent")
    except NotADirectoryError:
        raise Precondition(f"target path {target}: a parent of it is not a directory") from None
    if stat.S_ISDIR(st.st_mode):
        if os.listdir(target):
            raise Precondition(f"target path {target} is a directory that is not empty")
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise Precondition(f"target path {target} is neither a file nor a directory")


def _make_directories(path: str, undo: Rollback) -> None:
    """os.makedirs, with each directory it makes removed again if the call fails."""
    missing = []
    cur = path
    while not os.path.lexists(cur):
        missing.append(cur)
        cur = os.path.dirname(cur)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to remove
        except (NotADirectoryError, FileNotFoundError) as e:
            raise Precondition(f"cannot make directory {d}: {e.strerror}") from None
        undo.add(f"making {d}", _remove_empty_dir, d)
    if not os.path.isdir(path):
        raise Precondition(f"{path} is not a directory")


def _remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _remove_target(target: str) -> None:
    """Remove a publish target after unmounting: the CO expects it gone. Only an empty
    directory or an empty file: never data. Files written into the bare directory while
    nothing was mounted there (after a reboot) are not the volume's: they stay, with a
    warning, and the unpublish is done all the same (an error would be retried forever)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.warning("target %s holds files of its own once unmounted; left in place",
                        target)
    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(target)
