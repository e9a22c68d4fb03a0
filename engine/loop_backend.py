"""The loop backend: a sparse file per volume in a copy-on-write pool, behind loop devices.

The volume records and files are VolumeFiles' (engine/volumes.py), the pool's layout is
engine/pool.py and engine/layouts.py; this module adds what the Backend protocol asks of
devices: a direct-I/O loop device attached while the volume is staged (and a read-only
one per read-only block publish), found by the backing file's device and inode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from engine import fileops
from engine.backend import LOOP, Device
from engine.freeze import Freezer
from engine.loopdev import FileId, LoopDevice, LoopDevices, file_id
from engine.mounts import MountEntry, is_device_bind, mounts_device
from engine.node_records import NodeRecords
from engine.pool import Pool, PoolUsage
from engine.qos import capacity as capacity_mod
from engine.snapshots import Snapshots
from engine.state import Store
from engine.volumes import Backing, VolumeFiles

log = logging.getLogger(__name__)


class LoopDeviceView:
    """One reading of the loop devices; each device's backing identity read at most once."""

    def __init__(self, backend: LoopBackend):
        self.backend = backend
        self._devices: list[LoopDevice] | None = None
        self._ids: dict[str, FileId | None] = {}

    def devices_of(self, backing: Backing) -> list[Device]:
        path = self.backend.path(backing)
        ident = file_id(path)
        if ident is None:
            return []
        loops = self.backend.loops
        if self._devices is None:
            self._devices = loops.all()
        name = os.path.basename(path)
        found: list[Device] = []
        for dev in self._devices:
            if os.path.basename(dev.backing_file) != name:
                continue
            if dev.name not in self._ids:
                self._ids[dev.name] = loops.backing_id(dev)
            if self._ids[dev.name] == ident:
                found.append(dev)
        return found


class LoopBackend(VolumeFiles):
    kind = LOOP

    def __init__(self, store: Store, pool: Pool, loops: LoopDevices):
        super().__init__(store, pool)
        self.loops = loops

    # --- life ----------------------------------------------------------------------
    def open(self) -> None:
        self.pool.open()
        capacity_mod.remove_scratch(self.pool.directory)  # a measurement cut short

    # --- capacity and copy-on-write -------------------------------------------------
    def usage(self) -> PoolUsage:
        return self.pool.usage()

    def max_volumes(self) -> int | None:
        return None  # loop devices are as many as the kernel makes

    def measure_capacity(self, seconds: int) -> capacity_mod.Capacity:
        """fio on a scratch file of the pool, never on a volume (engine/qos/capacity.py)."""
        return capacity_mod.measure(self.pool.directory, seconds=seconds)

    def make_snapshots(self, store: Store, volumes, freezer: Freezer) -> Snapshots:
        return Snapshots(store, self.pool, self, volumes, freezer)

    def check_copy_on_write(self, what: str) -> None:
        return None  # reflinks and subvolume snapshots: always

    def replica_file(self, backing: Backing) -> str:
        return self.path(backing)

    def replica_directory(self) -> str:
        return os.path.join(self.pool.directory, "replicas")

    # --- devices -------------------------------------------------------------------
    def devices(self, backing: Backing) -> list[Device]:
        return list(self.loops.by_backing_file(self.path(backing)))

    def attach(self, backing: Backing, *, read_only: bool = False) -> Device:
        return self.loops.attach(self.path(backing), read_only=read_only,
                                 sector_size_bytes=backing.sector_size_bytes,
                                 strict_direct_io=False)

    def release(self, backing: Backing, dev: Device, *, require_released: bool = False) -> None:
        self.loops.detach(dev.path, file_id(self.path(backing)),
                          require_released=require_released)

    def refreshed(self, backing: Backing, dev: Device) -> Device:
        if dev.size_bytes != backing.size_bytes:
            return self.loops.refresh_capacity(dev.path)  # expanded since it was attached
        return dev

    def still_holds(self, backing: Backing, dev: Device) -> bool:
        loop = self.loops.by_path(dev.path)
        return loop is not None and self.loops.holds(loop, self.path(backing))

    def device_at(self, path: str) -> Device | None:
        return self.loops.by_path(path)

    def holds_data(self, backing: Backing, dev: Device) -> bool:
        fileops.fsync_path(dev.path)  # writes still in the device's page cache count too
        return fileops.has_data(self.path(backing))

    def filesystem_bytes(self, backing: Backing) -> int:
        return 0

    def storage_missing(self, backing: Backing) -> str:
        if os.path.exists(self.path(backing)):
            return ""
        return "the volume's backing file is missing from the pool"

    def device_view(self) -> LoopDeviceView:
        return LoopDeviceView(self)

    def release_unowned(self, records: NodeRecords, table: Iterable[MountEntry]) -> None:
        """Detach loop devices on pool files that no record uses and nothing mounts."""
        owners: dict[FileId, str] = {}
        for backing in self.all():
            ident = file_id(self.path(backing))
            if ident is not None:
                owners[ident] = backing.volume_id
        kept_ro = {p.ro_device for p in records.list_publishes() if p.ro_device and p.done}
        pool_dir = self.pool.volumes_dir + os.sep
        names = {os.path.basename(self.path(b)) for b in self.all()}
        names |= {os.path.basename(d.backing_file) for d in self.loops.all()
                  if d.backing_file.startswith(pool_dir)}
        table = list(table)
        for dev, ident in self.loops.identified(names):
            owner = owners.get(ident)
            if owner is None and not dev.backing_file.startswith(pool_dir):
                continue  # not provably on our pool: someone else's
            if any(mounts_device(m, dev) or is_device_bind(m, dev) for m in table):
                continue
            staged = owner is not None and records.get_stage(owner) is not None
            if staged and not dev.read_only:
                continue  # a staged block volume: its device is its state
            if owner is not None and dev.path in kept_ro:
                continue  # a published read-only block device (its bind may be elsewhere)
            log.warning("detaching %s (%s): no record uses it", dev.path, dev.backing_file)
            self.loops.detach(dev.path, ident)
