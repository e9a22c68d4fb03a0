"""The NVMe backend: one namespace per volume on this node's NVMe subsystem.

Two ways to get namespaces, chosen by configuration (`--nvme-namespaces`):
- `manage`: CreateVolume makes a namespace (create-ns, with the LBA format of the sector
  size asked), attaches it to the local controller (attach-ns), rescans, waits for its
  block device in sysfs; DeleteVolume detaches and deletes it. Needs Namespace
  Management, which is checked at start-up with a harmless probe (a reserved SEL value):
  QEMU's emulated controller, like many drives, advertises the capability yet answers
  Invalid Command Opcode, and is refused with that said.
- `pool`: pre-created namespaces (`--nvme-pool-nsids`), detached while free. CreateVolume
  claims the smallest free one that fits and attaches it; DeleteVolume wipes it (write
  zeroes or a format with user-data erase) while still attached, labels it free and
  detaches it: no tenant ever reads another's data.

A volume's namespace stays attached for the volume's whole life; stage and publish use
its block device directly (a read-only block publish gets a read-only loop device on it,
since a read-only bind of a device node does not stop writes). Devices are found by
subsystem NQN + NSID in sysfs and checked against the WWID recorded at attach.

Records (node store): the volume's `backing` record (pool_name `nsid-N`) and one
`nvme-namespace` record per namespace Tandem uses (state, volume, identity). The
controller is the truth: at start-up records are checked against it, a namespace is
never deleted because a record is missing, and a lost store is rebuilt from the labels
in the namespaces' last blocks (engine/nvme/label.py).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from engine import filesystem
from engine.backend import NVME, Device
from engine.errors import (
    AlreadyExists,
    EngineError,
    InUse,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    Precondition,
)
from engine.loopdev import LoopDevice, LoopDevices, file_id
from engine.mounts import MountEntry, is_device_bind, mounts_device
from engine.node_records import NodeRecords
from engine.nvme import label as labels
from engine.nvme import status as st
from engine.nvme.cli import ControllerInfo, NamespaceInfo, NvmeCli
from engine.nvme.sysfs import Controller, NamespaceDevice, NvmeSysfs
from engine.pool import PoolUsage
from engine.qos import capacity as capacity_mod
from engine.qos import fio
from engine.snapshots import NoSnapshots
from engine.state import Store
from engine.volumes import (
    EMPTY,
    Backing,
    PoolObject,
    check_version,
    set_backing_made_fs,
    set_backing_qos,
)

log = logging.getLogger(__name__)

KIND = "backing"
NS_KIND = "nvme-namespace"
MANAGE, POOL = "manage", "pool"
WRITE_ZEROES, FORMAT = "write-zeroes", "format"
# nvme-namespace record states
CREATING, VOLUME, DELETING, FREE, DIRTY, WIPING = (
    "creating", "volume", "deleting", "free", "dirty", "wiping")
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a range, by Write Zeroes where the drive has it
SAMPLE_BLOCKS = 64  # blocks read to tell a namespace with data from a blank one
NO_COW = ("its volumes are NVMe namespaces, which have no copy-on-write snapshots or clones; "
          "use a StorageClass of the loop backend for volumes that need them "
          "(docs/nvme.md)")


@dataclass(frozen=True)
class NvmeConfig:
    subsysnqn: str
    namespaces: str = MANAGE  # MANAGE or POOL
    pool_nsids: tuple[int, ...] = ()
    measure_nsid: int = 0  # reserved for measuring IOPS capacity; 0: none
    controller: str = ""  # "nvme0": a controller of the subsystem (default: the live one)
    sector_size_bytes: int = 4096  # LBA data size of the namespaces made (manage)
    lba_format: int = -1  # FLBAS index to use (manage); -1: the one of sector_size_bytes
    wipe: str = WRITE_ZEROES
    device_timeout_s: float = 30.0
    node_id: str = ""

    def check(self) -> None:
        if not self.subsysnqn:
            raise InvalidSpec("the NVMe backend needs the subsystem NQN (--nvme-subsystem)")
        if self.namespaces not in (MANAGE, POOL):
            raise InvalidSpec(f"--nvme-namespaces must be {MANAGE} or {POOL}")
        if self.namespaces == POOL and not self.pool_nsids:
            raise InvalidSpec("--nvme-namespaces pool needs the pre-created namespaces "
                              "(--nvme-pool-nsids 1-8)")
        if self.measure_nsid and self.measure_nsid in self.pool_nsids:
            raise InvalidSpec(f"namespace {self.measure_nsid} cannot be both the IOPS "
                              "measurement's and a volume's")
        if self.wipe not in (WRITE_ZEROES, FORMAT):
            raise InvalidSpec(f"--nvme-wipe must be {WRITE_ZEROES} or {FORMAT}")
        if self.sector_size_bytes not in (512, 4096):
            raise InvalidSpec("--nvme-sector-size must be 512 or 4096")


@dataclass(frozen=True)
class NamespaceRecord:
    nsid: int
    state: str
    volume_id: str = ""
    device_bytes: int = 0  # the whole namespace
    block_bytes: int = 0
    lba_format: int = 0
    wwid: str = ""  # the kernel's identity of the namespace, checked at every lookup
    nguid: str = ""  # from Identify Namespace; "" or zeroes when the drive has none

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, rec: dict) -> NamespaceRecord:
        return cls(**rec)


def pool_name(nsid: int) -> str:
    return f"nsid-{nsid}"


def nsid_of(backing: Backing) -> int:
    return int(backing.pool_name.removeprefix("nsid-"))


def _blank_nguid(nguid: str) -> bool:
    return not nguid.strip("0")


class NvmeDeviceView:
    """One reading of the subsystem's namespaces and the loop devices (read-only
    publishes) on them."""

    def __init__(self, backend: NvmeBackend):
        self.backend = backend
        self._by_nsid = {d.nsid: d for d in backend.sysfs.namespaces(backend.config.subsysnqn)}
        self._loops: list[LoopDevice] | None = None

    def devices_of(self, backing: Backing) -> list[Device]:
        ns = self._by_nsid.get(nsid_of(backing))
        if ns is None or not self.backend.same_namespace(backing, ns):
            return []
        if self._loops is None:
            self._loops = self.backend.loops.all()
        return [ns, *self.backend.ro_loops_on(ns, self._loops)]


class NvmeBackend:
    kind = NVME

    def __init__(self, store: Store, config: NvmeConfig, *, cli: NvmeCli | None = None,
                 sysfs: NvmeSysfs | None = None, loops: LoopDevices | None = None):
        config.check()
        self.store = store
        self.config = config
        self.sysfs = sysfs or NvmeSysfs()
        self.loops = loops or LoopDevices()
        self._cli = cli  # None: made at open() for the controller found then
        self.controller: Controller | None = None
        self.info: ControllerInfo | None = None
        self.orphans: list[str] = []  # Tandem-labelled namespaces no volume record owns
        self.foreign: list[int] = []  # namespaces in the pool Tandem will not touch
        # claims read the free namespaces and record one as taken: one at a time, or two
        # creates of different volumes (each under its own volume lock) take the same one
        self._claim_lock = threading.Lock()

    @property
    def cli(self) -> NvmeCli:
        if self._cli is None:
            raise Precondition("the NVMe backend is not open")
        return self._cli

    @property
    def cntlid(self) -> int:
        assert self.controller is not None, "open() first"
        return self.controller.cntlid

    # --- records -----------------------------------------------------------------------
    def get(self, volume_id: str) -> Backing | None:
        rec = self.store.get(KIND, volume_id)
        return Backing.from_record(volume_id, rec) if rec else None

    def require(self, volume_id: str) -> Backing:
        backing = self.get(volume_id)
        if backing is None:
            raise NotFound(f"volume {volume_id} has no namespace on this node")
        return backing

    def all(self) -> list[Backing]:
        return [Backing.from_record(k, r) for k, r in self.store.list(KIND)]

    def ns_record(self, nsid: int) -> NamespaceRecord | None:
        rec = self.store.get(NS_KIND, str(nsid))
        return NamespaceRecord.from_record(rec) if rec else None

    def ns_records(self) -> list[NamespaceRecord]:
        return [NamespaceRecord.from_record(r) for _, r in self.store.list(NS_KIND)]

    def _put_ns(self, rec: NamespaceRecord) -> None:
        self.store.put(NS_KIND, str(rec.nsid), rec.record())

    check_version = staticmethod(check_version)

    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None:
        set_backing_qos(self.store, volume_id, qos_json, version, "namespace")

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing:
        return set_backing_made_fs(self.store, volume_id, fs_type, done, "namespace")

    # --- start-up ----------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.config
        self.controller = self.sysfs.controller(cfg.subsysnqn, cfg.controller)
        if self._cli is None:
            self._cli = NvmeCli(self.sysfs.controller_dev(self.controller))
        self.info = self.cli.id_ctrl()
        if cfg.namespaces == MANAGE:
            self._check_ns_management()
        else:
            self._check_pool()
        log.info("NVMe backend on %s (%s, controller %s, cntlid %d): %s namespaces",
                 cfg.subsysnqn, self.info.model, self.controller.name, self.cntlid,
                 cfg.namespaces)

    def _check_ns_management(self) -> None:
        assert self.info is not None
        if not self.info.advertises_ns_management:
            raise Precondition(
                f"controller {self.info.model} ({self.config.subsysnqn}) has no Namespace "
                "Management (OACS bit 3 clear): volumes cannot be made as namespaces; "
                "pre-create namespaces and serve them as a pool (--nvme-namespaces pool "
                "--nvme-pool-nsids ...)")
        answer = self.cli.probe_ns_management()
        if answer is not None and answer.key == st.INVALID_OPCODE:
            raise Precondition(
                f"controller {self.info.model} ({self.config.subsysnqn}) advertises Namespace "
                "Management but answers it with Invalid Command Opcode (QEMU's emulated "
                "controller does): pre-create namespaces and serve them as a pool "
                "(--nvme-namespaces pool --nvme-pool-nsids ...)")

    def _check_pool(self) -> None:
        missing = []
        for nsid in self.config.pool_nsids:
            try:
                if not self.cli.id_ns(nsid).exists:
                    missing.append(nsid)
            except NotFound:
                missing.append(nsid)
        if missing:
            raise Precondition(f"pool namespaces {missing} do not exist on "
                               f"{self.config.subsysnqn}; create them (nvme create-ns) or "
                               "fix --nvme-pool-nsids")

    def _allocated(self) -> list[int]:
        """NSIDs allocated on the controller (attached or not)."""
        try:
            found = set(self.cli.allocated_nsids())
        except EngineError as e:
            log.warning("cannot list the allocated namespaces (%s); counting attached ones", e)
            found = set()
        return sorted(found | set(self.cli.attached_nsids()))

    def reconcile(self) -> None:
        """Check records against the controller; rebuild lost records from labels; report
        (never delete) labelled namespaces no volume owns."""
        known = {r.nsid: r for r in self.ns_records()}
        for rec in known.values():
            self._check_record(rec)
        if self.config.namespaces == POOL:
            candidates = list(self.config.pool_nsids)
        else:
            candidates = [n for n in self.cli.attached_nsids() if n != self.config.measure_nsid]
        for nsid in candidates:
            if nsid not in known:
                self._adopt(nsid)
        owned = {b.pool_name for b in self.all()}
        self.orphans = [pool_name(r.nsid) for r in self.ns_records()
                        if r.state == VOLUME and pool_name(r.nsid) not in owned]
        for name in self.orphans:
            log.warning("orphan namespace %s: labelled as a volume no record owns; kept", name)

    def _check_record(self, rec: NamespaceRecord) -> None:
        try:
            info = self.cli.id_ns(rec.nsid)
        except NotFound:
            info = None
        if info is None or not info.exists:
            log.error("namespace %d (%s of %s) is gone from the controller", rec.nsid,
                      rec.state, rec.volume_id or "the pool")
            return
        if not _blank_nguid(rec.nguid) and info.nguid != rec.nguid:
            log.error("namespace %d has NGUID %s, recorded %s: re-created behind the driver's "
                      "back; not used", rec.nsid, info.nguid, rec.nguid)
            return
        if rec.state in (VOLUME, CREATING) and rec.volume_id and self.get(rec.volume_id):
            # a volume's namespace stays attached for the volume's life
            try:
                self._attach_device(rec.nsid, rec.device_bytes)
            except EngineError as e:
                log.error("namespace %d of volume %s cannot be attached: %s", rec.nsid,
                          rec.volume_id, e)

    def _adopt(self, nsid: int) -> None:
        """A namespace with no record: rebuild its record from its label (a lost store), or
        take a blank pool namespace in; anything else is left alone and reported."""
        info = self.cli.id_ns(nsid)
        if not info.exists:
            return
        attached_here = self.sysfs.namespace(self.config.subsysnqn, nsid) is not None
        dev = self._attach_device(nsid, info.size_bytes)
        found = labels.read(dev.path, dev.size_bytes)
        keep_attached = False
        if found is not None and found.state == labels.VOLUME and found.volume_id:
            self._rebuild(nsid, info, dev, found)
            keep_attached = True
        elif self.config.namespaces == POOL:
            if found is not None and found.state == labels.FREE:
                self._put_ns(self._ns_rec(nsid, FREE, "", info, dev))
            elif found is None and labels.label_area_is_blank(dev.path, dev.size_bytes) \
                    and filesystem.probe(dev.path) is None:
                log.info("pool namespace %d has no label and looks blank: taken into the "
                         "pool (wiped before its first use)", nsid)
                self._put_ns(self._ns_rec(nsid, DIRTY, "", info, dev))
            else:
                log.warning("pool namespace %d carries data and no Tandem label: not used "
                            "(wipe it and restart to give it to Tandem)", nsid)
                self.foreign.append(nsid)
        if not keep_attached and not attached_here:
            self._detach(nsid)

    def _rebuild(self, nsid: int, info: NamespaceInfo, dev: NamespaceDevice,
                 found: labels.Label) -> None:
        log.warning("rebuilding the record of volume %s from the label of namespace %d",
                    found.volume_id, nsid)
        backing = Backing(found.volume_id, pool_name(nsid), found.size_bytes,
                          found.sector_size_bytes or dev.block_bytes, found.created_at, EMPTY,
                          access_types=tuple(found.access_types))
        with self.store.txn() as t:
            if t.get(KIND, found.volume_id) is None:
                t.put(KIND, found.volume_id, backing.record())
            t.put(NS_KIND, str(nsid), self._ns_rec(nsid, VOLUME, found.volume_id, info,
                                                   dev).record())

    def _ns_rec(self, nsid: int, state: str, volume_id: str, info: NamespaceInfo,
                dev: NamespaceDevice | None) -> NamespaceRecord:
        return NamespaceRecord(nsid, state, volume_id, info.size_bytes, info.block_bytes,
                               info.lba_format, dev.wwid if dev else "", info.nguid)

    # --- capacity ----------------------------------------------------------------------
    def max_volumes(self) -> int | None:
        """Pool: the pool's namespaces. Manage: the controller's namespace limit less the
        namespaces that are not Tandem's (read after reconcile, so records rebuilt from
        labels count as ours)."""
        if self.config.namespaces == POOL:
            return len(self.config.pool_nsids)
        assert self.info is not None, "open() first"
        foreign = [n for n in self._allocated()
                   if self.ns_record(n) is None and n != self.config.measure_nsid]
        return max(0, self.info.namespace_limit - len(foreign))

    def usage(self) -> PoolUsage:
        """Thick capacity, in the controller's terms: `free` counts this node's own volumes
        as free because the control plane subtracts them as provisioned (so free minus
        provisioned is what can still be made; run with overcommit 1)."""
        provisioned = sum(b.size_bytes for b in self.all())
        if self.config.namespaces == POOL:
            recs = [r for r in self.ns_records() if r.nsid in self.config.pool_nsids]
            total = sum(labels.usable_bytes(r.device_bytes) for r in recs)
            spare = sum(labels.usable_bytes(r.device_bytes) for r in recs
                        if r.state in (FREE, DIRTY))
            return PoolUsage(total, spare + provisioned, 0)
        info = self.cli.id_ctrl()
        return PoolUsage(info.total_bytes, info.unallocated_bytes + provisioned, 0)

    def measure_capacity(self, seconds: int) -> capacity_mod.Capacity:
        """The reserved namespace's IOPS (below), as the capacity admission uses."""
        iops = self.measure_iops()
        return capacity_mod.Capacity(
            iops, capacity_mod.MEASURED,
            f"fio 4 KiB random 50/50 direct on namespace {self.config.measure_nsid}, "
            "reserved for it", time.time())

    def measure_iops(self) -> int:
        """fio on the namespace reserved for it (--nvme-measure-nsid), never a live one."""
        nsid = self.config.measure_nsid
        if not nsid:
            raise Precondition("the NVMe backend measures its IOPS capacity only on a "
                               "namespace reserved for it: give --nvme-measure-nsid, or "
                               "--node-iops-capacity")
        if self.ns_record(nsid) is not None or nsid in self.config.pool_nsids:
            raise Precondition(f"namespace {nsid} holds or may hold a volume; it cannot be "
                               "the IOPS measurement's")
        info = self.cli.id_ns(nsid)
        attached_here = self.sysfs.namespace(self.config.subsysnqn, nsid) is not None
        dev = self._attach_device(nsid, info.size_bytes)
        try:
            found = labels.read(dev.path, dev.size_bytes)
            if found is not None and found.state != labels.MEASURE:
                raise Precondition(f"namespace {nsid} is labelled {found.state} "
                                   f"{found.volume_id}; not measured")
            labels.write(dev.path, dev.size_bytes, labels.Label(labels.MEASURE,
                                                                node_id=self.config.node_id))
            result = fio.run(fio.FioJob(
                filename=dev.path, rw="randrw", runtime_s=3.0, iodepth=16, name="capacity",
                size_bytes=labels.label_offset(dev.size_bytes)))
            return int(result.iops)
        finally:
            if not attached_here:
                self._detach(nsid)

    # --- copy-on-write, mirrors ----------------------------------------------------------
    def make_snapshots(self, store: Store, volumes, freezer) -> NoSnapshots:
        return NoSnapshots(f"node {self.config.node_id}: {NO_COW}")

    def check_copy_on_write(self, what: str) -> None:
        raise Precondition(f"{what} cannot be made on node {self.config.node_id}: {NO_COW}")

    def replica_file(self, backing: Backing) -> str:
        return self.replica_directory()  # refused, as below

    def replica_directory(self) -> str:
        raise Precondition(
            f"node {self.config.node_id} cannot hold mirror replicas: its volumes are NVMe "
            "namespaces, and the replica service keeps each replica as a sparse file with "
            "its dirty and activity maps; mirrored volumes need loop-backend nodes")

    # --- create / delete / expand -------------------------------------------------------
    def create(self, volume_id: str, size_bytes: int, *, clone_from: Backing | None = None,
               restore_from: PoolObject | None = None, qos_json: str = "", version: int = 0,
               access_types: tuple[str, ...] = (),
               role: str = "volume") -> Backing:
        if role != "volume":
            self.replica_directory()  # refused: replicas need loop-backend nodes
        if clone_from is not None or restore_from is not None:
            self.check_copy_on_write("a clone or restore")
        existing = self.get(volume_id)
        if existing is not None:
            if existing.size_bytes != size_bytes:
                raise AlreadyExists(f"volume {volume_id} already has a namespace")
            self._finish(existing)  # a create cut short after its records
            return existing
        access = tuple(sorted(set(access_types)))
        if self.config.namespaces == MANAGE:
            return self._create_namespace(volume_id, size_bytes, qos_json, version, access)
        return self._claim_namespace(volume_id, size_bytes, qos_json, version, access)

    def _lba_format(self) -> int:
        if self.config.lba_format >= 0:
            return self.config.lba_format
        for rec in self.ns_records():  # a namespace of ours shows the formats on offer
            formats = self.cli.id_ns(rec.nsid).lba_formats
            for f in formats:
                if f.data_bytes == self.config.sector_size_bytes and not f.metadata_bytes:
                    return f.index
        try:
            formats = self.cli.id_ns_common().lba_formats
        except EngineError:
            formats = ()
        for f in formats:
            if f.data_bytes == self.config.sector_size_bytes and not f.metadata_bytes:
                return f.index
        raise Precondition(f"cannot tell which LBA format has {self.config.sector_size_bytes}-"
                           "byte sectors without metadata on this controller; give "
                           "--nvme-lba-format (see `nvme id-ns -n 1 -f`)")

    def _create_namespace(self, volume_id: str, size_bytes: int, qos_json: str,
                          version: int, access: tuple[str, ...]) -> Backing:
        sector = self.config.sector_size_bytes
        if size_bytes % sector:
            raise InvalidSpec(f"size {size_bytes} is not a multiple of the sector size {sector}")
        device_bytes = size_bytes + labels.LABEL_AREA_BYTES
        info = self.cli.id_ctrl()
        if info.total_bytes and device_bytes > info.unallocated_bytes:
            raise OutOfCapacity(f"a namespace of {device_bytes} bytes does not fit: "
                                f"{self.config.subsysnqn} has {info.unallocated_bytes} bytes "
                                "unallocated")
        nsid = self.cli.create_ns(device_bytes // sector, self._lba_format())
        backing = Backing(volume_id, pool_name(nsid), size_bytes, sector, time.time(), EMPTY,
                          qos_json, "", version, access)
        with self.store.txn() as t:
            t.put(NS_KIND, str(nsid), NamespaceRecord(nsid, CREATING, volume_id, device_bytes,
                                                      sector).record())
            t.put(KIND, volume_id, backing.record())
        try:
            self._finish(backing)
        except BaseException:
            # our own namespace, made a moment ago and holding nothing yet
            self._undo_create(nsid, volume_id)
            raise
        return backing

    def _undo_create(self, nsid: int, volume_id: str) -> None:
        try:
            self._detach(nsid)
            self.cli.delete_ns(nsid)
        except EngineError as e:
            log.error("namespace %d of the failed create of %s stays: %s", nsid, volume_id, e)
            return
        with self.store.txn() as t:
            t.delete(NS_KIND, str(nsid))
            t.delete(KIND, volume_id)

    def _claim_namespace(self, volume_id: str, size_bytes: int, qos_json: str,
                         version: int, access: tuple[str, ...]) -> Backing:
        with self._claim_lock:
            backing = self._claim_record(volume_id, size_bytes, qos_json, version, access)
        self._finish(backing)
        return backing

    def _claim_record(self, volume_id: str, size_bytes: int, qos_json: str, version: int,
                      access: tuple[str, ...]) -> Backing:
        spare = sorted((r for r in self.ns_records()
                        if r.state in (FREE, DIRTY) and r.nsid in self.config.pool_nsids),
                       key=lambda r: (r.device_bytes, r.nsid))
        fits = [r for r in spare if labels.usable_bytes(r.device_bytes) >= size_bytes]
        if not fits:
            largest = max((labels.usable_bytes(r.device_bytes) for r in spare), default=0)
            raise OutOfCapacity(f"no free pre-created namespace holds {size_bytes} bytes "
                                f"(the largest free one holds {largest}; {len(spare)} free)")
        rec = fits[0]
        if size_bytes % rec.block_bytes:
            raise InvalidSpec(f"size {size_bytes} is not a multiple of the namespace's "
                              f"{rec.block_bytes}-byte blocks")
        backing = Backing(volume_id, pool_name(rec.nsid), size_bytes, rec.block_bytes,
                          time.time(), EMPTY, qos_json, "", version, access)
        # claimed while still marked dirty if it was: _finish wipes before labelling
        claimed = dataclasses.replace(rec, state=CREATING if rec.state == FREE else WIPING,
                                      volume_id=volume_id)
        with self.store.txn() as t:
            t.put(NS_KIND, str(rec.nsid), claimed.record())
            t.put(KIND, volume_id, backing.record())
        return backing

    def _finish(self, backing: Backing) -> None:
        """Attach the volume's namespace, wipe it if it was dirty, label it: converge."""
        nsid = nsid_of(backing)
        rec = self.ns_record(nsid)
        if rec is None:
            raise NotFound(f"volume {backing.volume_id}: namespace {nsid} has no record")
        if rec.state == VOLUME:
            self._attach_device(nsid, rec.device_bytes)
            return
        dev = self._attach_device(nsid, rec.device_bytes)
        if rec.state == WIPING:
            self._wipe(rec, dev)
        info = self.cli.id_ns(nsid)
        labels.write(dev.path, dev.size_bytes, labels.Label(
            labels.VOLUME, backing.volume_id, backing.size_bytes, backing.access_types,
            backing.created_at, backing.sector_size_bytes, self.config.node_id))
        self._put_ns(self._ns_rec(nsid, VOLUME, backing.volume_id, info, dev))

    def delete(self, volume_id: str) -> None:
        """Manage: detach and delete the namespace. Pool: wipe it (still attached), label
        it free, detach it. Records last, so a retry after a crash finishes the job."""
        backing = self.get(volume_id)
        if backing is None:
            return
        nsid = nsid_of(backing)
        rec = self.ns_record(nsid)
        if rec is None or rec.volume_id != volume_id:
            self.store.delete(KIND, volume_id)  # nothing of ours under it
            return
        dev = self.sysfs.namespace(self.config.subsysnqn, nsid)
        if dev is not None:
            if not self.same_namespace(backing, dev):
                raise Precondition(f"namespace {nsid} is no longer volume {volume_id}'s "
                                   f"(identity {dev.wwid}, recorded {rec.wwid}); not deleted")
            _check_released(dev)
        if self.config.namespaces == MANAGE:
            self._put_ns(dataclasses.replace(rec, state=DELETING))
            self._detach(nsid)
            self._delete_namespace(rec)
            with self.store.txn() as t:
                t.delete(NS_KIND, str(nsid))
                t.delete(KIND, volume_id)
            return
        if rec.state != DIRTY:
            self._put_ns(dataclasses.replace(rec, state=WIPING))
            dev = self._attach_device(nsid, rec.device_bytes)
            self._wipe(rec, dev)
            labels.write(dev.path, dev.size_bytes, labels.Label(labels.FREE,
                                                                node_id=self.config.node_id))
        self._detach(nsid)
        with self.store.txn() as t:
            t.put(NS_KIND, str(nsid), dataclasses.replace(rec, state=FREE,
                                                          volume_id="").record())
            t.delete(KIND, volume_id)

    def _delete_namespace(self, rec: NamespaceRecord) -> None:
        """delete-ns, after checking the NSID still names the namespace we made."""
        try:
            info = self.cli.id_ns(rec.nsid)
        except NotFound:
            return  # deleted already (a retry)
        if not info.exists:
            return
        if not _blank_nguid(rec.nguid) and info.nguid != rec.nguid:
            raise Precondition(f"namespace {rec.nsid} is not the one Tandem made (NGUID "
                               f"{info.nguid}, recorded {rec.nguid}); not deleted")
        try:
            self.cli.delete_ns(rec.nsid)
        except NotFound:
            return

    def expand(self, volume_id: str, size_bytes: int, version: int = 0) -> Backing:
        backing = self.require(volume_id)
        self.check_version(backing, version)
        if size_bytes == backing.size_bytes:
            return backing
        raise Precondition(f"volume {volume_id} is an NVMe namespace of fixed size "
                           f"({backing.size_bytes} bytes): namespaces cannot grow or shrink; "
                           "NVMe StorageClasses set allowVolumeExpansion: false")

    def purge_orphan(self, name: str) -> None:
        raise Precondition(f"{name}: orphan namespaces are purged by hand (nvme detach-ns, "
                           "delete-ns, or a wipe for a pool namespace); see docs/nvme.md")

    # --- devices -----------------------------------------------------------------------
    def same_namespace(self, backing: Backing, dev: NamespaceDevice) -> bool:
        rec = self.ns_record(nsid_of(backing))
        return rec is not None and (not rec.wwid or rec.wwid == dev.wwid)

    def _namespace_device(self, backing: Backing) -> NamespaceDevice | None:
        dev = self.sysfs.namespace(self.config.subsysnqn, nsid_of(backing))
        if dev is None:
            return None
        if not self.same_namespace(backing, dev):
            raise Precondition(f"namespace {dev.nsid} ({dev.name}) shows identity {dev.wwid}, "
                               f"not the one recorded for volume {backing.volume_id}: it was "
                               "re-created behind the driver's back; refusing to use it")
        return dev

    def _attach_device(self, nsid: int, size_bytes: int) -> NamespaceDevice:
        """Attach the namespace to the local controller (if it is not) and wait for its
        block device."""
        nqn = self.config.subsysnqn
        dev = self.sysfs.namespace(nqn, nsid)
        if dev is not None:
            return dev
        self.cli.attach_ns(nsid, self.cntlid)
        self.cli.rescan()
        return self.sysfs.wait_namespace(nqn, nsid, self.config.device_timeout_s, size_bytes)

    def _detach(self, nsid: int) -> None:
        self.cli.detach_ns(nsid, self.cntlid)
        self.cli.rescan()
        self.sysfs.wait_gone(self.config.subsysnqn, nsid, self.config.device_timeout_s)

    def _wipe(self, rec: NamespaceRecord, dev: NamespaceDevice) -> None:
        """Nothing of the last tenant may be read by the next: zero the whole namespace."""
        log.info("wiping namespace %d (%s, %d bytes) by %s", rec.nsid, dev.name,
                 dev.size_bytes, self.config.wipe)
        if self.config.wipe == FORMAT:
            self.cli.format_ns(rec.nsid, rec.lba_format, user_data_erase=True)
            self.cli.rescan()
            return
        fd = os.open(dev.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", 0, dev.size_bytes))
            os.fsync(fd)
        finally:
            os.close(fd)

    def devices(self, backing: Backing) -> list[Device]:
        ns = self._namespace_device(backing)
        if ns is None:
            return []
        return [ns, *self.ro_loops_on(ns, self.loops.all())]

    def ro_loops_on(self, ns: NamespaceDevice, loops: Iterable[LoopDevice]) -> list[Device]:
        ident = file_id(ns.path)
        return [d for d in loops
                if d.backing_file == ns.path and self.loops.backing_id(d) == ident]

    def attach(self, backing: Backing, *, read_only: bool = False) -> Device:
        rec = self.ns_record(nsid_of(backing))
        ns = self._namespace_device(backing) or self._attach_device(
            nsid_of(backing), rec.device_bytes if rec else 0)
        if not read_only:
            return ns
        # a read-only bind of a device node does not stop writes: a read-only loop device
        return self.loops.attach(ns.path, read_only=True, sector_size_bytes=ns.block_bytes,
                                 strict_direct_io=False)

    def release(self, backing: Backing, dev: Device, *, require_released: bool = False) -> None:
        if isinstance(dev, NamespaceDevice):
            return  # the namespace stays attached for the volume's life
        ns = self.sysfs.namespace(self.config.subsysnqn, nsid_of(backing))
        self.loops.detach(dev.path, file_id(ns.path) if ns else None,
                          require_released=require_released)

    def refreshed(self, backing: Backing, dev: Device) -> Device:
        return dev  # namespaces never change size under a volume

    def still_holds(self, backing: Backing, dev: Device) -> bool:
        loop = self.loops.by_path(dev.path)
        ns = self._namespace_device(backing)
        return loop is not None and ns is not None and self.loops.holds(loop, ns.path)

    def device_at(self, path: str) -> Device | None:
        name = os.path.basename(path)
        if name.startswith("loop"):
            return self.loops.by_path(path)
        for ns in self.sysfs.namespaces(self.config.subsysnqn):
            if ns.name == name:
                return ns
        return None

    def holds_data(self, backing: Backing, dev: Device) -> bool:
        """A namespace has no extent map to ask: Tandem makes or wipes each one blank, and
        here samples it: the first and last MiB of the volume and SAMPLE_BLOCKS blocks
        spread over it. Any non-zero byte is data. A write the samples miss is not seen;
        volumes created for mount access only are never staged as block devices, so the
        question only arises for volumes created for both (docs/nvme.md)."""
        size = backing.size_bytes
        step = max(4096, (size // SAMPLE_BLOCKS) // 4096 * 4096)
        offsets = [(0, 1 << 20), (size - (1 << 20), 1 << 20)]
        offsets += [(off, 4096) for off in range(0, size, step)]
        for off, length in offsets:
            if off >= 0 and any(labels.read_block(dev.path, off, length)):
                return True
        return False

    def filesystem_bytes(self, backing: Backing) -> int:
        return backing.size_bytes  # the label sits past it

    def storage_missing(self, backing: Backing) -> str:
        nsid = nsid_of(backing)
        try:
            dev = self.sysfs.namespace(self.config.subsysnqn, nsid)
        except OSError as e:
            return f"namespace {nsid} cannot be read in sysfs: {e}"
        if dev is None:
            return (f"the volume's namespace {nsid} is not attached to this node's controller "
                    "(detached behind the driver's back, or deleted)")
        if not self.same_namespace(backing, dev):
            return f"namespace {nsid} was re-created behind the driver's back"
        return ""

    def device_view(self) -> NvmeDeviceView:
        return NvmeDeviceView(self)

    def release_unowned(self, records: NodeRecords, table: Iterable[MountEntry]) -> None:
        """Read-only loop devices on our namespaces that no publish uses; namespaces
        themselves stay attached (they are the volumes)."""
        kept = {p.ro_device for p in records.list_publishes() if p.ro_device and p.done}
        table = list(table)
        loops = self.loops.all()
        for backing in self.all():
            ns = self.sysfs.namespace(self.config.subsysnqn, nsid_of(backing))
            if ns is None:
                continue
            for dev in self.ro_loops_on(ns, loops):
                if dev.path in kept or any(mounts_device(m, dev) or is_device_bind(m, dev)
                                           for m in table):
                    continue
                log.warning("detaching %s (on %s): no record uses it", dev.path, ns.name)
                self.loops.detach(dev.path, file_id(ns.path))


def _check_released(dev: NamespaceDevice) -> None:
    """A namespace about to be detached must not be in use: an exclusive open fails while
    anything mounts it or holds it exclusively."""
    try:
        fd = os.open(dev.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise InUse(f"{dev.path} (namespace {dev.nsid}) is still in use (mounted or held "
                        "open); release it first") from None
        if e.errno == errno.ENOENT:
            return
        raise
    os.close(fd)
