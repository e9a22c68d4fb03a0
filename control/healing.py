"""Self-healing of mirrored volumes: a replica away too long is replaced.

A replica whose node has been unregistered (its agent's lease gone) for longer than
`replace_after_s` is replaced by a new one on another node of the volume's zones (the
same zone first, else another of its zones that holds none of its replicas: PV node
affinity cannot change after creation). The replacement starts marked for a full rebuild
(control/node_mirror.py ReplicaHost.create): the volume's frontend, now or at its next
start, copies it whole from an in-sync replica. The order keeps every step safe to repeat:

1. the new replica's storage on its node (create_replica, idempotent);
2. the volume record's replica set, by compare-and-set: the lost replica moves to
   `retired_replicas` (its storage still exists on its node);
3. the arbiter's record: the new replica out of sync, the old one gone;
4. the frontend, if the volume is attached, serves the new set (set_frontend_replicas);
5. when the retired replica's node is back, its storage is removed.

A replica that returns before `replace_after_s` just resyncs its dirty regions (the
frontend does that on its own). Runs on the leader, in the reconciler's rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from control.node_api import NewReplica, NodeInfo
from control.placement import room_problem
from control.records import READY, VOLUME, ReplicaPlacement, VolumeRecord
from control.registry import NodeRegistry
from control.store import Conflict, Put, Store
from control.volumes import Volumes
from engine.errors import EngineError
from mirror.spec import ReplicaState

log = logging.getLogger(__name__)


class Healer:
    def __init__(self, store: Store, nodes: NodeRegistry, volumes: Volumes,
                 replace_after_s: float, clock: Callable[[], float]):
        self.store = store
        self.nodes = nodes
        self.volumes = volumes
        self.replace_after_s = replace_after_s
        self.clock = clock
        self._away_since: dict[tuple[str, str], float] = {}

    def run_once(self) -> None:
        now = self.clock()
        for _, got in self.store.list(VOLUME):
            vol = VolumeRecord.from_value(got.value)
            if vol.state != READY or not vol.mirrored:
                continue
            if not vol.retired_replicas and not self._replacements_due(vol, now):
                continue  # nothing to do: the volume's lock stays free for the CO's calls
            try:
                with self.volumes.locks.hold(vol.volume_id):
                    self._heal(vol, got.version, now)
            except EngineError as e:  # busy, a node away, a race: the next round tries again
                log.info("healing of %s postponed: %s", vol.volume_id, e)

    def _heal(self, vol: VolumeRecord, version: int, now: float) -> None:
        if vol.retired_replicas:  # a frontend away when its set changed learns it now
            self._tell_frontend(vol)
        for node_id in vol.retired_replicas:
            node = self.nodes.get(node_id)
            if node is not None:  # back: the retired replica's storage goes
                node.delete_replica(vol.volume_id, version)
                vol, version = self._save(vol.replace(retired_replicas=tuple(
                    n for n in vol.retired_replicas if n != node_id)), version)
        for placement in self._replacements_due(vol, now):
            vol, version = self._replace(vol, version, placement)
            self._away_since.pop((vol.volume_id, placement.node_id), None)

    def _replacements_due(self, vol: VolumeRecord, now: float) -> list[ReplicaPlacement]:
        """The replicas whose nodes have been away for replace_after_s (and notes since
        when the others are away)."""
        due = []
        for placement in vol.replicas:
            key = (vol.volume_id, placement.node_id)
            if self.nodes.known(placement.node_id):
                self._away_since.pop(key, None)
                continue
            since = self._away_since.setdefault(key, now)
            if now - since >= self.replace_after_s:
                due.append(placement)
        return due

    def _replace(self, vol: VolumeRecord, version: int,
                 lost: ReplicaPlacement) -> tuple[VolumeRecord, int]:
        target = self._target(vol, lost)
        if target is None:
            log.warning("replica of %s on %s is lost and no node of its zones has room for "
                        "a new one; it stays out of sync", vol.volume_id, lost.node_id)
            return vol, version
        info = self.nodes.require(target.node_id).create_replica(NewReplica(
            vol.volume_id, vol.capacity_bytes, vol.qos, version, rebuild=True))
        new = ReplicaPlacement(target.node_id, target.zone, info.address)
        replicas = tuple(new if r.node_id == lost.node_id else r for r in vol.replicas)
        first = replicas[0]
        vol, version = self._save(vol.replace(
            replicas=replicas, node_id=first.node_id, zone=first.zone,
            retired_replicas=(*vol.retired_replicas, lost.node_id)), version)
        self._arbiter_swap(vol.volume_id, lost.node_id, new.node_id)
        log.warning("replica of %s on %s was away for %.0f s: replaced by a new one on %s "
                    "(rebuilt in full)", vol.volume_id, lost.node_id, self.replace_after_s,
                    new.node_id)
        self._tell_frontend(vol)
        return vol, version

    def _target(self, vol: VolumeRecord, lost: ReplicaPlacement) -> NodeInfo | None:
        holding = {r.node_id for r in vol.replicas} | set(vol.retired_replicas)
        taken_zones = {r.zone for r in vol.replicas if r.node_id != lost.node_id}
        candidates = [n for n in self.nodes.infos()
                      if n.node_id not in holding and n.zone in vol.access_zones
                      and (n.zone == lost.zone or n.zone not in taken_zones)
                      and n.replica_address
                      and not room_problem(n, self.volumes.index,
                                           self.volumes.policy.overcommit_ratio,
                                           vol.capacity_bytes, vol.qos)]
        candidates.sort(key=lambda n: (n.zone != lost.zone, -n.free_bytes))
        return candidates[0] if candidates else None

    def _save(self, vol: VolumeRecord, version: int) -> tuple[VolumeRecord, int]:
        try:
            new_version = self.store.commit([Put(vol.key, vol.to_value(), expect=version)])
        except Conflict:
            raise Conflict([vol.key], f"volume {vol.volume_id} changed meanwhile") from None
        self.volumes.index.note(vol.volume_id, vol, new_version)
        return vol, new_version

    def _arbiter_swap(self, volume_id: str, old: str, new: str) -> None:
        arbiter = self.volumes.mirrors.arbiter
        for _ in range(16):
            current = arbiter.get(volume_id)
            states = {k: v for k, v in current.replicas.items() if k != old}
            states[new] = ReplicaState.OUT_OF_SYNC.value
            if arbiter.compare_and_set(replace(current, replicas=states),
                                       current.version) is not None:
                return
        raise Conflict([volume_id], f"the arbiter record of {volume_id} is contended")

    def _tell_frontend(self, vol: VolumeRecord) -> None:
        """The frontend of an attached volume serves the new set now (else at its start)."""
        replicas = tuple(f"{r.node_id}@{r.address}" for r in vol.replicas if r.address)
        for attachment in self.volumes.attachments(vol.volume_id):
            node = self.nodes.get(attachment.node_id)
            if node is not None:
                node.set_frontend_replicas(vol.volume_id, replicas)
