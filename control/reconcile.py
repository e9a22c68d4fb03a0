"""The controller's reconciler: finish or abandon what a crash or a lost race left behind.

- A CREATING record past its deadline (nobody retried the create) becomes a tombstone.
- A tombstone's storage is removed when its node is reachable, then the tombstone goes.
- Storage a node holds that no record names (neither live nor tombstone) is an orphan: it
  is REPORTED, never removed here. A store that was partitioned, lagging or restored from
  a backup must not delete live data; an operator purges orphans explicitly.
Runs at start-up and then periodically (in a cluster, on the leader only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from control.healing import Healer
from control.records import (
    CREATING,
    DELETING,
    GROUP,
    SNAPSHOT,
    VOLUME,
    GroupRecord,
    SnapshotRecord,
    VolumeRecord,
)
from control.registry import NodeRegistry
from control.snapshots import Snapshots
from control.store import Store
from control.volumes import Volumes
from engine.errors import EngineError

log = logging.getLogger(__name__)


@dataclass
class Orphans:
    """Storage found on nodes that no cluster record names, by node: the node has its
    own record of it (pool objects without even that are the node's own orphans)."""

    volumes: dict[str, list[str]] = field(default_factory=dict)
    snapshots: dict[str, list[str]] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(v) for v in self.volumes.values()) + sum(
            len(v) for v in self.snapshots.values())


class Reconciler:
    def __init__(self, store: Store, nodes: NodeRegistry, volumes: Volumes,
                 snapshots: Snapshots, clock: Callable[[], float],
                 report: Callable[[Orphans], None] | None = None):
        self.store = store
        self.nodes = nodes
        self.volumes = volumes
        self.snapshots = snapshots
        self.clock = clock
        self.orphans = Orphans()
        self.healer: Healer | None = None  # mirrored volumes' lost replicas (cluster mode)
        self.report = report  # called with each round's orphans (tandem-admin reads them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Orphans:
        now = self.clock()
        known_volumes: set[str] = set()
        for _, got in self.store.list(VOLUME):
            vol = VolumeRecord.from_value(got.value)
            known_volumes.add(vol.volume_id)
            self._settle(vol.volume_id, self._volume, vol, got.version, now)
        for _, got in self.store.list(GROUP):
            group = GroupRecord.from_value(got.value)
            if group.state == DELETING:
                self._settle(group.group_id, self.snapshots.converge_group_deleted, group,
                             got.version)
        known_snapshots: set[str] = set()
        for _, got in self.store.list(SNAPSHOT):
            snap = SnapshotRecord.from_value(got.value)
            known_snapshots.add(snap.snapshot_id)
            self._settle(snap.snapshot_id, self._snapshot, snap, got.version, now)
        if self.healer is not None:
            self.healer.run_once()
        self.orphans = self._find_orphans(known_volumes, known_snapshots)
        if self.report is not None:
            self.report(self.orphans)
        return self.orphans

    def _settle(self, what: str, work: Callable[..., object], *args: object) -> None:
        try:
            work(*args)
        except EngineError as e:  # busy, node away, a race: the next round tries again
            log.info("reconcile of %s postponed: %s", what, e)

    def _volume(self, vol: VolumeRecord, version: int, now: float) -> None:
        if vol.state == DELETING:
            if self.volumes.index.storage_removed(vol.volume_id, version):
                # its storage went through this controller: only the tombstone is left
                # (its sweep may have failed: queued again, never the node call again)
                self.volumes.remove_tombstone(vol, version)
                return
            with self.volumes.locks.hold(vol.volume_id):
                self.volumes.converge_deleted(vol, version)
        elif vol.state == CREATING and vol.intent_deadline and now > vol.intent_deadline:
            with self.volumes.locks.hold(f"volume-name:{vol.name}", vol.volume_id):
                self.volumes.abandon_intent(vol, version)

    def _snapshot(self, snap: SnapshotRecord, version: int, now: float) -> None:
        if snap.group_id:
            return  # with its group
        if snap.state == DELETING:
            with self.snapshots.locks.hold(snap.snapshot_id):
                self.snapshots.converge_deleted(snap, version)
        elif snap.state == CREATING and snap.intent_deadline and now > snap.intent_deadline:
            with self.snapshots.locks.hold(f"snapshot-name:{snap.name}", snap.snapshot_id):
                self.snapshots.abandon_intent(snap, version)

    def _find_orphans(self, volumes: set[str], snapshots: set[str]) -> Orphans:
        found = Orphans()
        for node_id in self.nodes.ids():
            node = self.nodes.get(node_id)
            if node is None:
                continue
            try:
                inventory = node.inventory()
            except EngineError as e:
                log.info("inventory of %s postponed: %s", node_id, e)
                continue
            lost_volumes = [v.volume_id for v in inventory.volumes if v.volume_id not in volumes]
            lost_snaps = [s.snapshot_id for s in inventory.snapshots
                          if s.snapshot_id not in snapshots]
            for vid in lost_volumes:
                log.warning("orphan: volume %s on %s has no record (kept; `tandem-admin "
                            "orphans` lists, `tandem-admin purge` removes)", vid, node_id)
            for sid in lost_snaps:
                log.warning("orphan: snapshot %s on %s has no record (kept)", sid, node_id)
            if lost_volumes:
                found.volumes[node_id] = lost_volumes
            if lost_snaps:
                found.snapshots[node_id] = lost_snaps
        return found

    # --- background ------------------------------------------------------------------
    def start(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 - keep reconciling; the next round retries
                    log.exception("reconcile round failed")

        self._thread = threading.Thread(target=loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
