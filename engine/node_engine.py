"""One node's storage behind one object: the engine's facade.

Two callers use it: the node API implementation (control/local_node.py, for the
controller: volumes, snapshots, capacity) and the CSI Node service (stage, publish, stats,
expand, for the kubelet). Both take the same per-volume lock table (`self.locks`), so a
snapshot's freeze can never race an unstage, whoever asked for which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.backend import Backend
from engine.errors import InUse
from engine.freeze import Freezer
from engine.locks import KeyLocks
from engine.mounts import Mounts
from engine.node_qos import NodeQos
from engine.node_records import NodeRecords, PoolInfo
from engine.node_volumes import Condition, KernelView, NodeVolumes, PublishRequest
from engine.pool import PoolUsage
from engine.qos.tiers import QosSpec
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
                 mounts: Mounts, qos: NodeQos | None = None, iops_capacity: int = 0):
        """backend: where the volumes' blocks live (engine/backend.py: loop or nvme)."""
        self.identity = identity
        self.store = store
        self.records = NodeRecords(store)
        self.qos = qos or NodeQos(store, enabled=False)
        self.iops_capacity = iops_capacity
        self._configured_iops = iops_capacity
        self.files = backend  # records of the volumes and their storage
        self.qos.attach(self.files)
        self.volumes = NodeVolumes(store, self.files, mounts)
        self.freezer = Freezer(store)
        self.snapshots = backend.make_snapshots(store, self.volumes, self.freezer)
        self.locks = KeyLocks()  # one per node: every caller's per-volume operations

    @property
    def backend(self) -> Backend:
        return self.files

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
        self.iops_capacity = self._configured_iops or self._measured_iops()

    def close(self) -> None:
        self.qos.close()

    def _measured_iops(self) -> int:
        """The pool's IOPS capacity for guaranteed minima: measured once, then kept."""
        info = self.records.get_pool_info()
        if info is None:
            iops = self.files.measure_iops()
            log.info("%s pool measured at %d IOPS (4 KiB random 50/50, direct)",
                     self.files.kind, iops)
            info = PoolInfo(iops_capacity=iops)
            self.records.put_pool_info(info)
        return info.iops_capacity

    # --- what the controller calls (through the node API) ------------------------------
    def create_volume(self, volume_id: str, size_bytes: int, qos: QosSpec,
                      clone_from_volume: str = "", version: int = 0,
                      access_types: tuple[str, ...] = ()) -> Backing:
        """access_types: "block" and/or "mount", as the volume was created for (kept, so
        staging it otherwise is refused: a mount stage of a block volume would format it)."""
        if not clone_from_volume:
            return self.files.create(volume_id, size_bytes, qos_json=qos.to_json(),
                                     version=version, access_types=access_types)
        self.files.check_copy_on_write("a clone")
        source = self.files.require(clone_from_volume)
        # a clone of a volume in use is as consistent as a snapshot of it
        with self.snapshots.quiesced([clone_from_volume], allow_block_in_use=True):
            return self.files.create(volume_id, size_bytes, clone_from=source,
                                     qos_json=qos.to_json(), version=version,
                                     access_types=access_types)

    def restore_volume(self, volume_id: str, size_bytes: int, qos: QosSpec,
                       snapshot_id: str, version: int = 0,
                       access_types: tuple[str, ...] = ()) -> Backing:
        self.files.check_copy_on_write("a volume restored from a snapshot")
        return self.files.create(volume_id, size_bytes,
                                 restore_from=self.snapshots.require(snapshot_id),
                                 qos_json=qos.to_json(), version=version,
                                 access_types=access_types)

    def delete_volume(self, volume_id: str, version: int = 0) -> None:
        """Delete the volume's storage once no device holds it any more: a device a
        driver lost track of is released first, or the delete refused while it is in use."""
        backing = self.files.get(volume_id)
        if backing is None:
            return
        self.files.check_version(backing, version)
        if self.volumes.stage_record(volume_id) is not None:
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
