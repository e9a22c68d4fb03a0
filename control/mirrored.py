"""The controller's part in mirrored volumes: replicas made and removed on their nodes,
the arbiter's record, and attach = fence.

A mirrored volume's record (control/records.py) lists its replicas (node, zone). Its
arbiter record (`arbiter/<volume_id>`, control/store_arbiter.py) holds the generation and
which replicas are in sync; replica ids are node ids.

ControllerPublish to a node bumps the generation in the arbiter record (compare-and-set),
then installs it on every reachable replica (fence_replica): from that moment no frontend
of an older generation can write to them, even if its node comes back. A replica that
cannot be reached is recorded out of sync in the same record, so the new frontend repairs
it on its return (its activity log and dirty map are read then). The generation and the
replicas' addresses go to the node in publish_context; its frontend takes ownership at
exactly that generation.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from control.node_api import NewReplica, VolumeSource
from control.records import VolumeRecord
from control.registry import NodeRegistry
from control.store import Conflict, Delete, Store
from control.store_arbiter import StoreArbiter
from control.store_arbiter import key as arbiter_key
from engine.errors import EngineError, InvalidSpec, NotFound, Unavailable
from mirror.arbiter import VolumeRecord as ArbiterRecord
from mirror.spec import ReplicaState

log = logging.getLogger(__name__)

# publish_context and volume_context keys (the node reads them at NodeStage)
GENERATION_KEY = "tandem.csi.dev/generation"
REPLICAS_KEY = "tandem.csi.dev/replicas"  # "node@host:port,node@host:port"
SIZE_KEY = "tandem.csi.dev/size-bytes"
MIRRORED_KEY = "tandem.csi.dev/mirrored"  # volume_context: "true"
MIN_IN_SYNC_KEY = "tandem.csi.dev/min-in-sync"
# publish_context: the volume's tier (QosSpec JSON) and the record version it is of; the
# consumer node enforces it on the frontend's device (a later ModifyVolume's wins)
QOS_KEY = "tandem.csi.dev/qos"
QOS_VERSION_KEY = "tandem.csi.dev/qos-version"
FRONTEND_PREFIX = "frontend/"
CAS_ATTEMPTS = 16


# StorageClass parameters of mirrored volumes
REPLICAS_PARAM, MIN_IN_SYNC_PARAM, REMOTE_ACCESS_PARAM = "replicas", "minInSync", "remoteAccess"
PARAMETER_KEYS = frozenset({REPLICAS_PARAM, MIN_IN_SYNC_PARAM, REMOTE_ACCESS_PARAM})
MAX_REPLICAS = 3


def parse_parameters(params: dict[str, str]) -> tuple[int, int, bool]:
    """(replicas, min_in_sync (0: the default), remote_access) from a StorageClass's
    parameters; InvalidSpec with the accepted values when they are wrong."""
    def whole(key: str, default: int, low: int, high: int) -> int:
        raw = params.get(key)
        if raw is None:
            return default
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidSpec(f"parameter {key}={raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise InvalidSpec(f"parameter {key}={raw!r} is outside {low}..{high}")
        return value

    replicas = whole(REPLICAS_PARAM, 1, 1, MAX_REPLICAS)
    min_in_sync = whole(MIN_IN_SYNC_PARAM, 0, 1, replicas)
    remote = params.get(REMOTE_ACCESS_PARAM, "false").strip().lower()
    if remote not in ("true", "false"):
        raise InvalidSpec(f"parameter {REMOTE_ACCESS_PARAM}={remote!r}: \"true\" or \"false\"")
    if replicas == 1 and (MIN_IN_SYNC_PARAM in params or remote == "true"):
        raise InvalidSpec(f"{MIN_IN_SYNC_PARAM} and {REMOTE_ACCESS_PARAM} apply to mirrored "
                          f"volumes ({REPLICAS_PARAM} 2 or 3)")
    return replicas, min_in_sync, remote == "true"


def default_min_in_sync(replicas: int) -> int:
    """1 of 2 (etcd's majority is the tiebreaker), a majority of 3."""
    return 1 if replicas <= 2 else replicas // 2 + 1


def volume_context(record: VolumeRecord) -> dict[str, str]:
    if not record.mirrored:
        return {}
    return {MIRRORED_KEY: "true", MIN_IN_SYNC_KEY: str(record.min_in_sync)}


class Mirrors:
    def __init__(self, store: Store, nodes: NodeRegistry):
        self.store = store
        self.nodes = nodes
        self.arbiter = StoreArbiter(store)

    # --- create / delete -----------------------------------------------------------------
    def realize(self, record: VolumeRecord, version: int,
                plan: dict[str, VolumeSource | None] | None = None) -> VolumeRecord:
        """Every replica on its node, then the arbiter's record. plan: each replica's
        first bytes (control/mirror_seeds.py): a source on its node, or None: empty and
        marked for a full rebuild (recorded out of sync); none: all empty, all in sync.
        Idempotent: a retry after a crash finishes what is missing. Returns the record with
        each replica's address (its node's replica service)."""
        if plan is None:
            plan = {p.node_id: VolumeSource() for p in record.replicas}
        placed = []
        for placement in record.replicas:
            source = plan[placement.node_id]
            info = self.nodes.require(placement.node_id).create_replica(NewReplica(
                record.volume_id, record.capacity_bytes, record.qos, version,
                rebuild=source is None, source=source or VolumeSource()))
            placed.append(replace(placement, address=info.address))
        try:
            self.arbiter.get(record.volume_id)
        except NotFound:
            first = ArbiterRecord(record.volume_id, 0, "", {
                n: (ReplicaState.IN_SYNC if s is not None else ReplicaState.OUT_OF_SYNC).value
                for n, s in plan.items()})
            self.arbiter.compare_and_set(first, 0)  # None: a retry made it meanwhile
        return record.replace(replicas=tuple(placed))

    # --- growth and tiers --------------------------------------------------------------
    def expand(self, record: VolumeRecord, version: int) -> None:
        """Grow every replica to the record's size (ControllerExpandVolume; the frontend
        follows at NodeExpandVolume). Every replica's node must answer: a replica left at
        its old size could never serve the grown volume."""
        for placement in record.replicas:
            self.nodes.require(placement.node_id).expand_replica(
                record.volume_id, record.capacity_bytes, version)

    def require_reachable(self, record: VolumeRecord) -> None:
        away = [p.node_id for p in record.replicas if self.nodes.get(p.node_id) is None]
        if away:
            raise Unavailable(f"volume {record.volume_id}: the replica node(s) "
                              f"{', '.join(away)} cannot be reached, and every replica grows "
                              "together; retry when they are back")

    def set_consumers_qos(self, record: VolumeRecord, version: int,
                          consumers: list[str]) -> None:
        """The tier on the nodes the volume is attached to: their frontend's device is the
        pods' (limits are enforced there; minima are admitted on the replicas' nodes)."""
        for node_id in consumers:
            self.nodes.require(node_id).set_frontend_qos(record.volume_id, record.qos,
                                                         version)

    def remove(self, tomb: VolumeRecord, version: int) -> bool:
        """Every replica's storage, then the volume's arbiter and frontend keys. False while
        a replica's node is away (the tombstone waits for it)."""
        done = True
        for placement in tomb.replicas:
            node = self.nodes.get(placement.node_id)
            if node is None:
                log.warning("volume %s deleted; its replica on %s goes when the node is back",
                            tomb.volume_id, placement.node_id)
                done = False
                continue
            node.delete_replica(tomb.volume_id, version)
        if done:
            self.store.commit([Delete(arbiter_key(tomb.volume_id)),
                               Delete(FRONTEND_PREFIX + tomb.volume_id)])
        return done

    # --- attach = fence ----------------------------------------------------------------
    def fence_for(self, record: VolumeRecord, node_id: str, version: int = 0) -> dict[str, str]:
        """A new generation for the volume's frontend on node_id, installed on every
        reachable replica; returns the publish_context."""
        generation = self._bump(record.volume_id, node_id)
        unreachable = []
        for placement in record.replicas:
            try:
                self.nodes.require(placement.node_id).fence_replica(record.volume_id,
                                                                    generation)
            except (Unavailable, NotFound) as e:
                log.warning("replica of %s on %s not fenced (%s): recorded out of sync",
                            record.volume_id, placement.node_id, e)
                unreachable.append(placement.node_id)
        if len(unreachable) == len(record.replicas):
            raise Unavailable(f"no replica of {record.volume_id} could be reached; retry")
        if unreachable:
            self._out_of_sync(record.volume_id, generation, unreachable)
        return self.publish_context(record, generation, version)

    def publish_context(self, record: VolumeRecord, generation: int,
                        version: int = 0) -> dict[str, str]:
        addresses = []
        for placement in record.replicas:
            address = placement.address  # a node away now comes back where it was
            try:
                address = self.nodes.info(placement.node_id).replica_address or address
            except EngineError:
                pass
            if address:
                addresses.append(f"{placement.node_id}@{address}")
        return {GENERATION_KEY: str(generation), REPLICAS_KEY: ",".join(addresses),
                SIZE_KEY: str(record.capacity_bytes), QOS_KEY: record.qos.to_json(),
                QOS_VERSION_KEY: str(version)}

    def _bump(self, volume_id: str, node_id: str) -> int:
        for _ in range(CAS_ATTEMPTS):
            current = self.arbiter.get(volume_id)
            bumped = replace(current, generation=current.generation + 1,
                             owner=f"published:{node_id}")
            got = self.arbiter.compare_and_set(bumped, current.version)
            if got is not None:
                return got.generation
        raise Conflict([arbiter_key(volume_id)], f"the generation of {volume_id} is "
                                                 "contended; retry")

    def _out_of_sync(self, volume_id: str, generation: int, node_ids: list[str]) -> None:
        for _ in range(CAS_ATTEMPTS):
            current = self.arbiter.get(volume_id)
            if current.generation != generation:
                return  # a newer publish (or its frontend) decides now
            states = {**current.replicas, **{n: ReplicaState.OUT_OF_SYNC.value
                                             for n in node_ids}}
            if self.arbiter.compare_and_set(replace(current, replicas=states),
                                            current.version) is not None:
                return
        raise Conflict([arbiter_key(volume_id)], "the arbiter record is contended; retry")

    def frontend_view(self, volume_id: str) -> dict[str, dict]:
        """The serving frontend's view of each replica (state, connected, a resync's
        progress: control/frontend_main.py reports it); {} when none serves."""
        got = self.store.get(FRONTEND_PREFIX + volume_id)
        if got is None or got.value.get("state") != "serving":
            return {}
        return dict(got.value.get("replicas") or {})

    def replica_states(self, volume_id: str) -> dict[str, str]:
        try:
            return dict(self.arbiter.get(volume_id).replicas)
        except NotFound:
            return {}
