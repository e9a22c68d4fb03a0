"""Snapshots of mirrored volumes: one copy per replica, all taken at one write barrier.

The record (control/records.py SnapshotRecord.replicas) lists every copy (node, the
node's snapshot ID: the snapshot's own ID on each node), so a restore may start from any
of them and a delete removes them all. Intent first, as for every snapshot:

1. CREATING record, listing every reachable replica node (a copy may be made on each);
2. the write barrier (control/write_barrier.py); a copy of each replica the barrier names
   (snapshot_replica: copy-on-write, no freeze: the barrier is the quiesce);
3. the barrier resumed, and checked: held the whole time, no new attachment;
4. READY, listing the copies made.

A failure anywhere in 2-3 (a node lost, the barrier let go, a new attach) ends the intent
at once: its tombstone removes whatever copies were made (when their nodes are back), and
the error says to retry, which starts afresh under a new ID. Copies from two different
barriers must never end up in one record, so a CREATING record is never finished by
anyone but the call that made it: a retry after a crash (it finds the intent) waits a
minute for a call that may still be running, then ends the intent and asks to retry.

Replicas that are out of sync, or whose node is down, get no copy (the snapshot has fewer
copies, each identical); with none reachable in sync the snapshot is refused (Unavailable).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from control.records import CREATING, READY, ReplicaSnapshot, SnapshotRecord, VolumeRecord
from control.store import Conflict, Put
from control.write_barrier import WriteBarrier
from engine import crash
from engine.errors import Busy, EngineError, OutOfCapacity, Unavailable

if TYPE_CHECKING:
    from control.snapshots import Snapshots

log = logging.getLogger(__name__)

STALE_INTENT_S = 60.0  # a CREATING mirrored snapshot older than this has no live caller


class MirrorSnapshots:
    def __init__(self, snapshots: Snapshots):
        self.snapshots = snapshots
        self.nodes = snapshots.nodes
        volumes = snapshots.volumes
        self.barrier = WriteBarrier(volumes.mirrors.arbiter, self.nodes,
                                    lambda vid: [a.node_id for a in volumes.attachments(vid)])

    def intent(self, name: str, vol: VolumeRecord, request_hash: str, snapshot_id: str,
               now: float) -> SnapshotRecord:
        """The CREATING record: a copy may be made on every reachable replica node with
        room for its copy-on-write."""
        planned, full = [], []
        for r in vol.replicas:
            if self.nodes.get(r.node_id) is None:
                continue
            try:
                self.snapshots._check_room(r.node_id)  # noqa: SLF001 - same check as local
            except OutOfCapacity as e:
                full.append(str(e))
                continue
            except Unavailable as e:  # registered, but not answering (a cut link)
                log.warning("snapshot of %s: no copy on %s: %s", vol.volume_id, r.node_id, e)
                continue
            planned.append(r.node_id)
        if not planned:
            if full:
                raise OutOfCapacity("; ".join(full))
            raise Unavailable(f"no replica of {vol.volume_id} can be reached")
        return SnapshotRecord(
            snapshot_id=snapshot_id, name=name, request_hash=request_hash, state=CREATING,
            source_volume_id=vol.volume_id, node_id=planned[0], size_bytes=vol.capacity_bytes,
            created_at=now, intent_deadline=now + self.snapshots.intent_timeout_s,
            replicas=tuple(ReplicaSnapshot(n, snapshot_id) for n in planned))

    def realize(self, snap: SnapshotRecord, version: int, vol: VolumeRecord) -> SnapshotRecord:
        """Take the copies at one barrier and confirm them; any failure ends the intent."""
        try:
            return self._take(snap, version, vol)
        except EngineError:
            try:
                self.snapshots.abandon_intent(snap, version)
            except EngineError as e:  # the reconciler ends it later
                log.warning("the failed snapshot intent %s stays for now: %s",
                            snap.snapshot_id, e)
            raise

    def _take(self, snap: SnapshotRecord, version: int, vol: VolumeRecord) -> SnapshotRecord:
        planned = {r.node_id for r in snap.replicas}
        made: list[tuple[str, float, int]] = []
        with self.barrier.held(vol, snap.snapshot_id) as held:
            members = [n for n in held.members if n in planned]
            if not members:
                raise Unavailable(f"no replica of {vol.volume_id} identical at the barrier "
                                  "has room for a copy now; retry")
            for node_id in members:
                info = self.nodes.require(node_id).snapshot_replica(snap.snapshot_id,
                                                                    vol.volume_id)
                made.append((node_id, info.created_at, info.size_bytes))
                crash.point("mirror-snapshot-after-copy")
        ready = snap.replace(
            state=READY, node_id=made[0][0], size_bytes=made[0][2],
            created_at=min(t for _, t, _ in made), intent_deadline=0.0,
            replicas=tuple(ReplicaSnapshot(n, snap.snapshot_id) for n, _, _ in made))
        left_out = planned - {n for n, _, _ in made}
        if left_out:
            log.info("snapshot %s of %s: no copy on %s (not identical at the barrier)",
                     snap.snapshot_id, vol.volume_id, ", ".join(sorted(left_out)))
        try:
            self.snapshots.store.commit([Put(ready.key, ready.to_value(), expect=version)])
        except Conflict:
            raise Busy("the snapshot was abandoned or changed meanwhile; retry") from None
        log.info("created snapshot %s (%s) of mirrored %s: copies on %s", ready.snapshot_id,
                 ready.name, vol.volume_id, ", ".join(ready.node_ids))
        return ready

    def resume(self, snap: SnapshotRecord, version: int, now: float) -> SnapshotRecord:
        """A retry finds the intent of an interrupted call: never finished from here (its
        copies may come from another barrier); ended once it is surely orphaned."""
        if now - snap.created_at < STALE_INTENT_S:
            raise Busy(f"snapshot {snap.snapshot_id} is being taken; retry")
        log.warning("ending the interrupted snapshot %s (%s): its copies are taken again",
                    snap.snapshot_id, snap.name)
        self.snapshots.abandon_intent(snap, version)
        raise Unavailable(f"an interrupted attempt of snapshot {snap.name!r} was cleared; "
                          "retry")

    def converge_deleted(self, tomb: SnapshotRecord) -> bool:
        """Every copy removed; False while a node holding one is away."""
        done = True
        for copy in tomb.replicas:
            node = self.nodes.get(copy.node_id)
            if node is None:
                log.warning("snapshot %s deleted; its copy on %s goes when the node is back",
                            tomb.snapshot_id, copy.node_id)
                done = False
                continue
            node.delete_snapshot(copy.snapshot_id)
        return done
