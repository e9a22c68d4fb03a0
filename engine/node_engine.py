"""One node's storage behind one object: the engine's facade.

Two callers use it: the node API implementation (control/local_node.py, for the
controller: volumes, snapshots, capacity) and the CSI Node service (stage, publish, stats,
expand, for the kubelet). Both take the same per-volume lock table (`self.locks`), so a
snapshot's freeze can never race an unstage, whoever asked for which.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from engine.backend import Backend
from engine.errors import CommandFailed, InUse, Precondition
from engine.freeze import Freezer
from engine.locks import KeyLocks
from engine.mounts import Mounts
from engine.node_qos import NodeQos
from engine.node_records import NodeRecords
from engine.node_volumes import Condition, KernelView, NodeVolumes, PublishRequest
from engine.pool import PoolUsage
from engine.qos import capacity as capacity_mod
from engine.qos.capacity import Capacity
from engine.qos.tiers import QosSpec
from engine.routed_backend import FrontendVolumes, RoutedBackend
from engine.snapshots import SnapshotBacking
from engine.state import Store
from engine.volumes import Backing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    zone: str


class NodeEngine:
    def __init__(self, identity: NodeIdentity, store: Store, backend: Backend,
                 mounts: Mounts, qos: NodeQos | None = None, iops_capacity: int = 0,
                 measure_s: int = capacity_mod.RUN_S):
        """backend: where the volumes' blocks live (engine/backend.py: loop or nvme)."""
        self.identity = identity
        self.store = store
        self.records = NodeRecords(store)
        self.qos = qos or NodeQos(store, enabled=False)
        self._configured_iops = iops_capacity
        self._measure_s = measure_s
        self.files = backend  # records of the volumes and their storage
        self.qos.attach(self.files)
        self.volumes = NodeVolumes(store, self.files, mounts)
        self.freezer = Freezer(store)
        self.snapshots = backend.make_snapshots(store, self.volumes, self.freezer)
        self.locks = KeyLocks()  # one per node: every caller's per-volume operations

    @property
    def backend(self) -> Backend:
        return self.files

    def serve_frontends(self, frontends: FrontendVolumes) -> None:
        """Stage and publish mirrored volumes through their frontends (cluster nodes): the
        node path asks a router that knows both them and the pool (engine/routed_backend)."""
        self.volumes.files = RoutedBackend(self.files, frontends)  # type: ignore[assignment]
        # a mirrored volume's tier is its frontend's here (its pods use the frontend's device)
        self.qos.attach(self.volumes.files)  # type: ignore[arg-type]

    def max_volumes(self, configured: int) -> int:
        """Volumes this node may hold: the configured number, or fewer if the backend
        has a limit of its own (an NVMe controller's namespaces)."""
        own = self.files.max_volumes()
        return configured if own is None else min(configured, own)

    def open(self) -> None:
        """Bring the pool up and settle whatever a crash or restart left half-done."""
        self.files.open()
        self.freezer.thaw_all_recorded()  # first: a frozen filesystem blocks everything else
        self.files.reconcile()
        self.volumes.reconcile()
        self.snapshots.reconcile()
        self.qos.open()
        self._settle_capacity()

    def close(self) -> None:
        self.qos.close()

    # --- IOPS capacity (engine/qos/capacity.py) ---------------------------------------
    @property
    def iops_capacity(self) -> int:
        return self.capacity().iops

    def capacity(self) -> Capacity:
        """The pool's IOPS capacity for guaranteed minima. Read from the store at each use:
        a figure set or measured again with tandem-admin takes effect without a restart."""
        return capacity_mod.load(self.store) or Capacity(0, "", "not measured yet", 0.0)

    def _settle_capacity(self) -> None:
        """At start: the flag's figure, else the one kept, else measure now (first start)."""
        kept = capacity_mod.load(self.store)
        if self._configured_iops:
            flag = Capacity(self._configured_iops, capacity_mod.FLAG, "set by the driver's flag",
                            time.time())
            if kept is None or (kept.source, kept.iops) != (flag.source, flag.iops):
                capacity_mod.save(self.store, flag)
        elif kept is None:
            log.info("measuring the %s pool's IOPS capacity once, for guaranteed minima "
                     "(%d s, plus a warm-up)", self.files.kind,
                     self._measure_s + capacity_mod.warmup_for(self._measure_s))
            try:
                measured = self.files.measure_capacity(self._measure_s)
            except (CommandFailed, Precondition) as e:
                # Serve anyway: volumes without minima work, guaranteed ones are refused
                # (capacity 0) until a start measures it or an operator sets it.
                log.error("could not measure the pool's IOPS capacity (%s); no guaranteed "
                          "minimum is admitted until it is measured (next start, or "
                          "tandem-admin capacity measure) or set (tandem-admin capacity "
                          "set)", e)
                return
            capacity_mod.save(self.store, measured)
        cap = self.capacity()
        log.info("pool IOPS capacity %d (%s, %s; %s)", cap.iops, cap.source, cap.date,
                 cap.method)
        if cap.legacy:
            log.warning("the pool's IOPS capacity comes from a single 3-second run, which "
                        "can be far off; measure it again when the node is quiet: "
                        "tandem-admin capacity measure")

    # --- what the controller calls (through the node API) ------------------------------
    def create_volume(self, volume_id: str, size_bytes: int, qos: QosSpec,
                      clone_from_volume: str = "", version: int = 0,
                      access_types: tuple[str, ...] = (), role: str = "volume",
                      quiesce: bool = True) -> Backing:
        """access_types: "block" and/or "mount", as the volume was created for (kept, so
        staging it otherwise is refused: a mount stage of a block volume would format it).
        role "replica": a mirrored volume's copy, never staged here directly.
        quiesce=False: a clone of the source as it is (a mirror replica whose volume's
        write barrier the controller holds: freezing here would wait on that barrier)."""
        if not clone_from_volume:
            return self.files.create(volume_id, size_bytes, qos_json=qos.to_json(),
                                     version=version, access_types=access_types, role=role)
        self.files.check_copy_on_write("a clone")
        source = self.files.require(clone_from_volume)
        # a clone of a volume in use is as consistent as a snapshot of it
        at_rest = self.snapshots.quiesced([clone_from_volume], allow_block_in_use=True) \
            if quiesce else contextlib.nullcontext()
        with at_rest:
            return self.files.create(volume_id, size_bytes, clone_from=source,
                                     qos_json=qos.to_json(), version=version,
                                     access_types=access_types, role=role)

    def restore_volume(self, volume_id: str, size_bytes: int, qos: QosSpec,
                       snapshot_id: str, version: int = 0,
                       access_types: tuple[str, ...] = (), role: str = "volume") -> Backing:
        self.files.check_copy_on_write("a volume restored from a snapshot")
        return self.files.create(volume_id, size_bytes,
                                 restore_from=self.snapshots.require(snapshot_id),
                                 qos_json=qos.to_json(), version=version,
                                 access_types=access_types, role=role)

    def delete_volume(self, volume_id: str, version: int = 0) -> None:
        """Delete the volume's storage once no device holds it any more: a device a
        driver lost track of is released first, or the delete refused while it is in use."""
        backing = self.files.get(volume_id)
        if backing is None:
            return
        self.files.check_version(backing, version)
        # a replica is never staged itself (its volume's frontend is; the replica service
        # refuses to drop a replica a frontend has open)
        if backing.role != "replica" and self.volumes.stage_record(volume_id) is not None:
            raise InUse(f"volume {volume_id} is still staged on {self.identity.node_id}")
        for dev in self.files.devices(backing):
            if self.volumes.mounts.of_device(dev.major, dev.minor):
                raise InUse(f"volume {volume_id} is still mounted through {dev.path}")
            log.warning("releasing %s from volume %s before deleting it", dev.path,
                        volume_id)
            self.files.release(backing, dev, require_released=True)
        self.files.delete(volume_id)

    def replica_directory(self) -> str:
        """Where mirror replicas of other nodes' volumes may live on this node: a directory
        of the loop pool; an NVMe node refuses (Precondition, FAILED_PRECONDITION): the
        replica service keeps files, not namespaces (docs/nvme.md)."""
        return self.files.replica_directory()

    def set_qos(self, volume_id: str, qos: QosSpec, version: int = 0) -> None:
        """A tier change: recorded, and applied to the pods using the volume now."""
        self.qos.set_spec(volume_id, qos, version)

    # --- what the node service calls -----------------------------------------------
    def publish(self, req: PublishRequest) -> None:
        dev = self.volumes.publish(req)
        self.qos.published(req.volume_id, req.pod_uid, (dev.major, dev.minor))

    def unpublish(self, volume_id: str, target_path: str) -> None:
        rec = self.volumes.publish_record(volume_id, target_path)
        self.volumes.unpublish(volume_id, target_path)
        if rec is not None:
            self.qos.unpublished(volume_id, rec.pod_uid, rec.device)

    def create_snapshots(self, members: list[tuple[str, str]]) -> list[SnapshotBacking]:
        """(snapshot_id, volume_id) pairs, taken at one instant."""
        self.files.check_copy_on_write("a snapshot")
        if len(members) == 1:
            return [self.snapshots.create(*members[0])]
        return self.snapshots.create_group(members)

    def snapshot_as_is(self, snapshot_id: str, volume_id: str) -> SnapshotBacking:
        """A snapshot without a freeze: the caller holds the volume at rest (a mirror
        replica, under its volume's write barrier)."""
        self.files.check_copy_on_write("a snapshot")
        return self.snapshots.create_group([(snapshot_id, volume_id)], quiesce=False)[0]

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.delete(snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotBacking | None:
        return self.snapshots.get(snapshot_id)

    def expand_volume(self, volume_id: str, size_bytes: int, version: int = 0) -> Backing:
        return self.files.expand(volume_id, size_bytes, version)

    def volume(self, volume_id: str) -> Backing | None:
        return self.files.get(volume_id)

    def is_staged(self, volume_id: str) -> bool:
        return self.volumes.stage_record(volume_id) is not None

    def is_mounted(self, path: str) -> bool:
        return self.volumes.mounts.is_mounted(path)

    def kernel_view(self) -> KernelView:
        """One reading of mounts and loop devices, to ask many volume_condition()s."""
        return self.volumes.kernel_view()

    def volume_condition(self, volume_id: str, view: KernelView | None = None) -> Condition:
        """The volume's health here, from the kernel's state (lost devices and mounts)."""
        return self.volumes.condition(volume_id, view)

    def usage(self) -> PoolUsage:
        return self.files.usage()
