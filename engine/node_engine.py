"""One node's storage behind one object.

The controller talks to a node only through this interface (create, delete and grow
backing volumes, report the pool's space), so the same controller code can drive an
in-process engine (all-in-one) or a remote node agent (cluster).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.freeze import Freezer
from engine.loopdev import LoopDevices
from engine.mounts import Mounts
from engine.node_volumes import NodeVolumes
from engine.pool import Pool, PoolUsage
from engine.snapshots import SnapshotBacking, Snapshots
from engine.state import Store
from engine.volumes import Backing, VolumeFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    zone: str


class NodeEngine:
    def __init__(self, identity: NodeIdentity, store: Store, pool: Pool,
                 loops: LoopDevices, mounts: Mounts):
        self.identity = identity
        self.pool = pool
        self.files = VolumeFiles(store, pool)
        self.volumes = NodeVolumes(store, self.files, loops, mounts)
        self.freezer = Freezer(store)
        self.snapshots = Snapshots(store, pool, self.files, self.volumes, self.freezer)

    def open(self) -> None:
        """Bring the pool up and settle whatever a crash or restart left half-done."""
        self.pool.open()
        self.freezer.thaw_all_recorded()  # first: a frozen filesystem blocks everything else
        self.files.reconcile()
        self.volumes.reconcile()
        self.snapshots.reconcile()

    # --- what the controller calls -------------------------------------------------
    def create_volume(self, volume_id: str, size_bytes: int,
                      clone_from_volume: str = "") -> Backing:
        source = self.files.require(clone_from_volume) if clone_from_volume else None
        return self.files.create(volume_id, size_bytes, clone_from=source)

    def restore_volume(self, volume_id: str, size_bytes: int, snapshot_id: str) -> Backing:
        return self.snapshots.restore(snapshot_id, volume_id, size_bytes)

    def delete_volume(self, volume_id: str) -> None:
        self.files.delete(volume_id)

    def create_snapshots(self, members: list[tuple[str, str]]) -> list[SnapshotBacking]:
        """(snapshot_id, volume_id) pairs, taken at one instant."""
        if len(members) == 1:
            return [self.snapshots.create(*members[0])]
        return self.snapshots.create_group(members)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.delete(snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotBacking | None:
        return self.snapshots.get(snapshot_id)

    def expand_volume(self, volume_id: str, size_bytes: int) -> Backing:
        return self.files.expand(volume_id, size_bytes)

    def volume(self, volume_id: str) -> Backing | None:
        return self.files.get(volume_id)

    def is_staged(self, volume_id: str) -> bool:
        return self.volumes.stage_record(volume_id) is not None

    def usage(self) -> PoolUsage:
        return self.pool.usage()
