"""Restores and clones of mirrored volumes, and into mirrored volumes: where each new
replica's first bytes come from.

A content source (a snapshot, or a volume to clone) has copies on some nodes: a local
volume or snapshot on its node, a mirrored snapshot on every node holding one of its
copies, a mirrored volume on its replicas' nodes. A new volume goes where a copy is:

- replicas 1: on one of the copy nodes (the first with room), made copy-on-write there;
- replicas 2 or 3: one replica per zone, on copy nodes first (Seeds.place). A replica
  on a copy node is a copy-on-write copy there (in sync from the start); any other starts
  empty, recorded out of sync with every region marked (NewReplica.rebuild), and the
  volume's frontend copies it in full from an in-sync replica when it first serves (the
  condition says "resyncing n%"). At least
  minInSync replicas must be seeded: the frontend refuses writes with fewer in sync, so a
  restore with fewer copies would be unwritable until a rebuild ends (refused, saying so).

A clone of a mirrored volume copies its replicas at one write barrier
(control/write_barrier.py); a copy is in sync only if its source replica was identical
at the barrier. Copies made at two different barriers must never be in sync together, so
such a creation is never resumed: a failure ends the intent at once (its tombstone removes
what was made) and asks for a retry, which starts afresh; a retry that finds the intent
of an interrupted call waits a minute for it, then ends it the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from control import placement
from control.node_api import (
    SOURCE_REPLICA,
    SOURCE_SNAPSHOT,
    SOURCE_VOLUME,
    NewVolume,
    NodeInfo,
    VolumeSource,
)
from control.placement import Constraints
from control.records import VolumeRecord
from control.topology import TOPOLOGY_ZONE_KEY
from control.write_barrier import WriteBarrier
from engine.errors import Busy, Precondition, Unavailable
from engine.qos.tiers import QosSpec
from mirror.spec import ReplicaState

if TYPE_CHECKING:
    from control.volumes import Volumes

log = logging.getLogger(__name__)

STALE_INTENT_S = 60.0  # a CREATING one-instant clone older than this has no live caller

# what each new replica starts from: a source on its node (VolumeSource(): empty, for a
# volume without a content source), or None: empty, rebuilt from the others
Plan = dict[str, VolumeSource | None]


class Seeds:
    def __init__(self, volumes: Volumes):
        self.volumes = volumes
        self.nodes = volumes.nodes
        self.barrier = WriteBarrier(
            volumes.mirrors.arbiter, self.nodes,
            lambda vid: [a.node_id for a in volumes.attachments(vid)])

    # --- where the source is ---------------------------------------------------------------
    def copies(self, source: VolumeSource) -> tuple[tuple[str, ...], int]:
        """(nodes holding a copy of the source, its bytes)."""
        if source.kind == SOURCE_VOLUME:
            vol, _ = self.volumes.require_ready(source.source_id)
            return vol.node_ids, vol.capacity_bytes
        if source.kind == SOURCE_SNAPSHOT:
            return self.volumes.snapshot_copies(source.source_id)
        return (), 0

    def source_volume(self, record: VolumeRecord) -> VolumeRecord | None:
        """The mirrored volume a record clones (None: another kind of source)."""
        if record.source_kind != SOURCE_VOLUME:
            return None
        found = self.volumes.record(record.source_id)
        if found is None:
            raise Precondition(f"the source volume {record.source_id} of "
                               f"{record.volume_id} is gone")
        return found[0] if found[0].mirrored else None

    def one_instant(self, record: VolumeRecord) -> bool:
        """A mirrored clone of a mirrored volume (or of one gone since): its copies must
        come from one barrier."""
        if not record.mirrored or record.source_kind != SOURCE_VOLUME:
            return False
        found = self.volumes.record(record.source_id)
        return found is None or found[0].mirrored

    def place(self, count: int, size_bytes: int, qos: QosSpec, constraints: Constraints,
              copies: tuple[str, ...]) -> list[NodeInfo]:
        """Replica nodes, copy nodes first: in a zone where a copy node has room only copy
        nodes are candidates, and those zones come right after the pod's (as preferred
        topologies). Without copies: placement as for any mirrored volume."""
        volumes = self.volumes
        infos = volumes.nodes.infos()
        ratio = volumes.policy.overcommit_ratio
        if copies:
            roomy = [n for c in copies for n in infos if n.node_id == c
                     and not placement.room_problem(n, volumes.index, ratio, size_bytes, qos)]
            copy_zones = list(dict.fromkeys(n.zone for n in roomy))
            infos = [n for n in infos if n.node_id in copies or n.zone not in copy_zones]
            constraints = Constraints(
                constraints.requisite,
                constraints.preferred + tuple({TOPOLOGY_ZONE_KEY: z} for z in copy_zones),
                constraints.pinned_node)
        return placement.choose_replicas(infos, volumes.index, ratio, size_bytes, qos,
                                         constraints, count)

    def check_seeded(self, chosen: list[str], copies: tuple[str, ...], min_in_sync: int,
                     source: VolumeSource) -> None:
        seeded = [n for n in chosen if n in copies]
        if not seeded:
            raise Unavailable(f"no node holding a copy of {source.kind} {source.source_id} "
                              f"({', '.join(copies)}) can take a replica now")
        if len(seeded) < min_in_sync:
            raise Precondition(
                f"{source.kind} {source.source_id} has copies on {len(copies)} node(s) "
                f"({', '.join(copies)}), {len(seeded)} of them usable for the new replicas; "
                f"minInSync {min_in_sync} needs as many in sync before any write: restore "
                f"with minInSync {len(seeded)}, or into fewer replicas")

    # --- making a mirrored volume from its source ----------------------------------------------
    @contextlib.contextmanager
    def plan(self, record: VolumeRecord) -> Iterator[Plan]:
        """Each replica's source, for as long as the copies are being made (a clone of a
        mirrored volume: under its write barrier, checked when leaving)."""
        nodes = [r.node_id for r in record.replicas]
        if not record.source_kind:
            yield dict.fromkeys(nodes, VolumeSource())  # empty: all in sync (all zeros)
            return
        source = VolumeSource(record.source_kind, record.source_id)
        mirrored_source = self.source_volume(record)
        if mirrored_source is None:
            copies, _ = self.copies(source)
            yield {n: source if n in copies else None for n in nodes}
            return
        with self.barrier.held(mirrored_source, record.volume_id) as held:
            plan: Plan = {n: VolumeSource(SOURCE_REPLICA, record.source_id)
                          if n in held.members else None for n in nodes}
            seeded = sum(1 for s in plan.values() if s is not None)
            if seeded < record.min_in_sync:
                raise Unavailable(f"only {seeded} replica(s) of {record.source_id} were "
                                  "identical at the barrier where the clone needs them; retry")
            yield plan

    @staticmethod
    def states(plan: Plan) -> dict[str, str]:
        """The arbiter's first record: copies (and new empty volumes) in sync, replicas
        to rebuild out of sync."""
        return {n: (ReplicaState.IN_SYNC if s is not None else ReplicaState.OUT_OF_SYNC).value
                for n, s in plan.items()}

    def resume_one_instant(self, record: VolumeRecord, version: int, now: float) -> None:
        """A retry found the intent of an interrupted one-instant clone: never finished
        from here; ended once it is surely orphaned (then the retry starts afresh)."""
        if now - record.created_at < STALE_INTENT_S:
            raise Busy(f"volume {record.volume_id} is being cloned; retry")
        log.warning("ending the interrupted clone %s (%s): its copies are made again",
                    record.volume_id, record.name)
        self.volumes.abandon_intent(record, version)
        raise Unavailable(f"an interrupted attempt of volume {record.name!r} was cleared; "
                          "retry")

    # --- a local volume from a mirrored source --------------------------------------------
    def make_local(self, record: VolumeRecord, spec: NewVolume) -> None:
        """A local clone of a mirrored volume: a copy of the replica on the volume's node,
        identical at the barrier (any snapshot or local source: as a local clone)."""
        node = self.nodes.require(record.node_id)
        mirrored_source = self.source_volume(record)
        if mirrored_source is None:
            node.create_volume(spec)
            return
        with self.barrier.held(mirrored_source, record.volume_id) as held:
            if record.node_id not in held.members:
                raise Unavailable(f"the replica of {record.source_id} on {record.node_id} "
                                  "is not a consistent copy now (out of sync, or its node "
                                  "away); retry")
            node.create_volume(NewVolume(
                spec.volume_id, spec.size_bytes, spec.access_types, spec.qos,
                VolumeSource(SOURCE_REPLICA, record.source_id), spec.version))
