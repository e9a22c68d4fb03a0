"""Volumes' life cycle in the cluster: intent first, converge, never delete by absence.

CreateVolume writes the name's record and the volume's CREATING record (a fresh random ID
and the request's hash) in one guarded commit before any storage exists; the node then
makes the storage (idempotent by ID) and the record becomes READY. A retry after a crash
finds the intent and finishes it under the same ID; a different request under that name
is ALREADY_EXISTS. DeleteVolume turns the record into a tombstone first; only a tombstone
lets a node remove storage, and the tombstone goes once the node confirmed. Cross-node
serialization is compare-and-set on the records; each node call carries the version of
the record it acts on. Operations on one name or ID in this process are also excluded
from each other (ABORTED), as the CSI spec suggests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from control import mirrored, placement, policy, topology
from control.idempotency import CreateAsk, incompatibility
from control.mirror_seeds import Seeds
from control.node_api import SOURCE_BACKUP, NewVolume, VolumeSource
from control.records import (
    ATTACHMENT,
    CREATING,
    DELETING,
    READY,
    VOLUME,
    VOLUME_NAME,
    AttachmentRecord,
    NameRecord,
    ReplicaPlacement,
    VolumeRecord,
    attachment_key,
    new_volume_id,
    page,
)
from control.registry import NodeRegistry
from control.store import Conflict, Delete, Put, Store
from control.tombstones import TombstoneSweeper, delete_lock
from control.volume_index import VolumeIndex
from engine import crash
from engine.errors import (
    AlreadyExists,
    Busy,
    EngineError,
    InUse,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    OutOfRange,
    Precondition,
)
from engine.locks import KeyLocks
from engine.qos.tiers import QosSpec

if TYPE_CHECKING:
    from control.backups import Backups

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 8  # a name or record contended by other controllers: re-read and retry
# what a node answers when it can never make the volume asked for: the intent ends at once
REFUSALS = (Precondition, InvalidSpec, OutOfRange, OutOfCapacity, AlreadyExists, NotFound)


@dataclass(frozen=True)
class VolumeRequest:
    """A validated CreateVolume, in the control plane's terms."""

    name: str
    request_hash: str
    size_bytes: int
    access_types: tuple[str, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    mutable_parameters: dict[str, str] = field(default_factory=dict)
    qos: QosSpec = QosSpec()
    source: VolumeSource = VolumeSource()
    constraints: placement.Constraints = placement.Constraints()
    ask: CreateAsk | None = None  # for the spec's compatibility rule (control/idempotency.py)
    replicas: int = 1  # > 1: a mirrored volume, one replica per zone
    min_in_sync: int = 0  # 0: the default for the replica count
    remote_access: bool = False
    # the provisioner secrets (a restore from a backup reaches the bucket with them)
    secrets: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class VolumePolicy:
    overcommit_ratio: float = 20.0
    max_volumes_per_node: int = 128
    intent_timeout_s: float = 600.0  # a create not confirmed by then is abandoned
    replica_replace_after_s: float = 300.0  # a mirrored volume's replica away this long


class Volumes:
    def __init__(self, store: Store, nodes: NodeRegistry, index: VolumeIndex,
                 policy_: VolumePolicy, locks: KeyLocks,
                 snapshot_source: Callable[[str], tuple[str, int]] | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.nodes = nodes
        self.index = index
        self.policy = policy_
        self.locks = locks
        # snapshot_id -> (node_id, size_bytes) of a READY snapshot (NotFound otherwise)
        self.snapshot_source = snapshot_source
        self.clock = clock
        # removes confirmed tombstones in batches; None: at once, inside DeleteVolume
        self.sweeper: TombstoneSweeper | None = None
        self.mirrors = mirrored.Mirrors(store, nodes)
        # snapshot_id -> (nodes holding a copy, size_bytes) of a READY snapshot: a mirrored
        # volume's snapshot has one copy per replica (None: snapshot_source's one node)
        self.snapshot_copy_nodes: Callable[[str], tuple[tuple[str, ...], int]] | None = None
        self.seeds = Seeds(self)  # restores and clones of and into mirrored volumes
        self.backups: Backups | None = None  # restores from backups (control/backups.py)

    # --- reading ---------------------------------------------------------------------
    def record(self, volume_id: str) -> tuple[VolumeRecord, int] | None:
        got = self.store.get(VOLUME + volume_id)
        return (VolumeRecord.from_value(got.value), got.version) if got else None

    def require_ready(self, volume_id: str) -> tuple[VolumeRecord, int]:
        found = self.record(volume_id)
        if found is None or found[0].state != READY:
            raise NotFound(f"volume {volume_id!r} does not exist")
        return found

    def list_ready(self, after: str, limit: int) -> tuple[list[VolumeRecord], str]:
        """READY volumes in ID order after `after`; returns (page, last ID if more follow)."""
        return page(self.store, VOLUME, after, limit, VolumeRecord.from_value,
                    lambda v: v.state == READY, lambda v: v.volume_id)

    def attachments(self, volume_id: str) -> list[AttachmentRecord]:
        return [AttachmentRecord(**got.value)
                for _, got in self.store.list(f"{ATTACHMENT}{volume_id}/")]

    # --- create ----------------------------------------------------------------------
    def create(self, req: VolumeRequest) -> VolumeRecord:
        with self.locks.hold(f"volume-name:{req.name}"):
            for _ in range(CAS_ATTEMPTS):
                existing = self.store.get(VOLUME_NAME + req.name)
                if existing is not None:
                    return self._resume(req, NameRecord(**existing.value))
                record = self._intent(req)
                try:
                    version = self.store.commit([
                        Put(VOLUME_NAME + req.name,
                            {"object_id": record.volume_id, "request_hash": req.request_hash},
                            expect=0),
                        Put(record.key, record.to_value(), expect=0),
                    ])
                except Conflict:
                    continue  # another controller took the name first: look again
                self.index.note(record.volume_id, record, version)
                crash.point("create-volume-after-intent")
                return self._realize(record, version, req.secrets)
        raise Busy(f"volume name {req.name!r} is contended; retry")

    def _intent(self, req: VolumeRequest) -> VolumeRecord:
        copies, source_bytes = self.seeds.copies(req.source)
        if source_bytes > req.size_bytes:
            raise OutOfRange(f"the source holds {source_bytes} bytes, more than the "
                             f"{req.size_bytes} asked for")
        now = self.clock()
        if req.replicas > 1:
            return self._mirrored_intent(req, req.constraints, now, copies)
        node = self._place_local(req, copies)
        return VolumeRecord(
            volume_id=new_volume_id(), name=req.name, request_hash=req.request_hash,
            state=CREATING, capacity_bytes=req.size_bytes, node_id=node.node_id,
            zone=node.zone, access_types=tuple(sorted(set(req.access_types))),
            parameters=dict(req.parameters), mutable_parameters=dict(req.mutable_parameters),
            qos=req.qos, source_kind=req.source.kind, source_id=req.source.source_id,
            created_at=now, intent_deadline=now + self.policy.intent_timeout_s,
            **_asked(req),
        )

    def _place_local(self, req: VolumeRequest, copies: tuple[str, ...]):
        """A local volume's node: beside its source's copy (the first copy node with room,
        for a mirrored source), else anywhere its constraints allow."""
        tried: list[str] = []
        for pinned in copies or ("",):
            constraints = placement.Constraints(req.constraints.requisite,
                                                req.constraints.preferred, pinned)
            try:
                return placement.choose_node(self.nodes.infos(), self.index,
                                             self.policy.overcommit_ratio, req.size_bytes,
                                             req.qos, constraints)
            except OutOfCapacity as e:
                tried.append(str(e))
        raise OutOfCapacity("; ".join(tried))

    def _mirrored_intent(self, req: VolumeRequest, constraints: placement.Constraints,
                         now: float, copies: tuple[str, ...] = ()) -> VolumeRecord:
        if req.source.kind == SOURCE_BACKUP:  # its restore job fills one node's volume
            raise Precondition("a mirrored volume cannot be restored from a backup yet: "
                               "restore it into a volume with replicas: 1, snapshot that, "
                               "and restore the snapshot into a mirrored volume")
        chosen = self.seeds.place(req.replicas, req.size_bytes, req.qos, constraints, copies)
        min_in_sync = req.min_in_sync or mirrored.default_min_in_sync(req.replicas)
        if req.source.kind:
            self.seeds.check_seeded([n.node_id for n in chosen], copies,
                                    min(min_in_sync, req.replicas), req.source)
        zones = tuple(n.zone for n in chosen)
        if req.remote_access:  # every zone asked for (every zone known, when none was)
            asked = [n.zone for n in self.nodes.infos() if not constraints.requisite
                     or topology.matches_any(n.node_id, n.zone,
                                                       constraints.requisite)]
            zones = tuple(dict.fromkeys(zones + tuple(sorted(asked))))
        if not 1 <= min_in_sync <= req.replicas:
            raise InvalidSpec(f"minInSync {min_in_sync} is outside 1..{req.replicas}")
        return VolumeRecord(
            volume_id=new_volume_id(), name=req.name, request_hash=req.request_hash,
            state=CREATING, capacity_bytes=req.size_bytes, node_id=chosen[0].node_id,
            zone=chosen[0].zone, access_types=tuple(sorted(set(req.access_types))),
            parameters=dict(req.parameters), mutable_parameters=dict(req.mutable_parameters),
            qos=req.qos, source_kind=req.source.kind, source_id=req.source.source_id,
            created_at=now, intent_deadline=now + self.policy.intent_timeout_s,
            replicas=tuple(ReplicaPlacement(n.node_id, n.zone) for n in chosen),
            min_in_sync=min_in_sync, remote_access=req.remote_access, access_zones=zones,
            **_asked(req))

    def snapshot_copies(self, snapshot_id: str) -> tuple[tuple[str, ...], int]:
        """(nodes holding a copy, bytes) of a READY snapshot; NotFound otherwise."""
        if self.snapshot_copy_nodes is not None:
            return self.snapshot_copy_nodes(snapshot_id)
        if self.snapshot_source is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        node_id, size = self.snapshot_source(snapshot_id)
        return (node_id,), size

    def _resume(self, req: VolumeRequest, name: NameRecord) -> VolumeRecord:
        """The name is taken: the same request, or a compatible one, finishes or returns
        its volume; anything else is ALREADY_EXISTS."""
        found = self.record(name.object_id)
        if found is None:
            # a name record always commits with its volume's and goes with its tombstone
            raise Busy(f"volume name {req.name!r} points to a missing record; retry")
        record, version = found
        # the spec's rule when the request is known field by field (the topology is not in
        # the hash: a provisioner may recompute it on a retry); else the hash alone
        if req.ask is not None:
            why = incompatibility(record, req.ask)
        else:
            why = "another request" if name.request_hash != req.request_hash else ""
        if why:
            raise AlreadyExists(f"volume {req.name!r} exists with {why}")
        if record.state == READY:
            return record
        if record.state == CREATING:
            if self.seeds.one_instant(record):  # never finished by another call
                self.seeds.resume_one_instant(record, version, self.clock())
            log.info("resuming the creation of %s (%s)", record.volume_id, record.name)
            return self._realize(record, version, req.secrets)
        raise Busy(f"volume {record.volume_id} is being deleted; retry")

    def _realize(self, record: VolumeRecord, version: int,
                 secrets: dict[str, str] | None = None) -> VolumeRecord:
        """Make the intent's storage, then confirm it. A node's definite refusal (it cannot
        make such a volume) ends the intent at once; anything else leaves it for a retry."""
        try:
            return self._make_and_confirm(record, version, secrets or {})
        except EngineError as failure:
            # a clone of a mirrored volume into a mirrored one is never resumed either (its
            # copies must come from one write barrier): any failure ends it
            if isinstance(failure, REFUSALS) or self.seeds.one_instant(record):
                try:
                    self.abandon_intent(record, version)
                except EngineError as e:  # the reconciler ends it later
                    log.warning("the refused intent %s stays for now: %s", record.volume_id,
                                e)
            raise

    def _make_and_confirm(self, record: VolumeRecord, version: int,
                          secrets: dict[str, str]) -> VolumeRecord:
        if record.mirrored:
            with self.seeds.plan(record) as plan:  # a clone of a mirrored one: at a barrier
                record = self.mirrors.realize(record, version, plan)  # with their addresses
        else:
            node = self.nodes.require(record.node_id)
            self.seeds.make_local(record, NewVolume(
                volume_id=record.volume_id, size_bytes=record.capacity_bytes,
                access_types=record.access_types, qos=record.qos,
                source=VolumeSource(record.source_kind, record.source_id), version=version))
            if record.source_kind == SOURCE_BACKUP:
                if self.backups is None:
                    raise NotFound(f"backup {record.source_id!r} does not exist")
                # Busy (ABORTED: the provisioner retries) until restored and checked
                version = self.backups.restore(record, version, node, secrets)
        crash.point("create-volume-after-engine")
        ready = record.replace(state=READY, intent_deadline=0.0)
        try:
            new_version = self.store.commit([Put(record.key, ready.to_value(), expect=version)])
        except Conflict:
            current = self.record(record.volume_id)
            if current is not None and current[0].state == READY:
                return current[0]  # another controller confirmed it
            raise Busy(f"the creation of {record.volume_id} was abandoned meanwhile; "
                       "retry") from None
        self.index.note(record.volume_id, ready, new_version)
        log.info("created volume %s (%s, %d bytes) on %s", record.volume_id, record.name,
                 record.capacity_bytes, record.node_id)
        return ready

    # --- delete ----------------------------------------------------------------------
    def delete(self, volume_id: str) -> None:
        with delete_lock(self.locks, volume_id, lambda: self._is_tombstone(volume_id)) as held:
            if held:
                self._delete(volume_id, self.record(volume_id))

    def _is_tombstone(self, volume_id: str) -> bool:
        found = self.record(volume_id)
        return found is not None and found[0].state == DELETING

    def _delete(self, volume_id: str, found: tuple[VolumeRecord, int] | None) -> None:
        """`found`: the record as just read under the lock (a stale one fails its guard:
        read again)."""
        for _ in range(CAS_ATTEMPTS):
            if found is None:
                return
            record, version = found
            if record.state != DELETING:
                try:
                    record, version = self._tombstone(record, version, check_use=True)
                except Conflict:
                    found = self.record(volume_id)
                    continue
            elif self.index.storage_removed(volume_id, version):
                return  # a repeated call: only the sweep of the tombstone is left
            self.converge_deleted(record, version)
            return
        raise Busy(f"volume {volume_id} is contended; retry")

    def _tombstone(self, record: VolumeRecord, version: int,
                   check_use: bool) -> tuple[VolumeRecord, int]:
        if check_use:
            attached = self.attachments(record.volume_id)
            if attached:
                raise InUse(f"volume {record.volume_id} is still published to "
                            f"{', '.join(a.node_id for a in attached)}")
            node = self.nodes.get(record.node_id) if not record.mirrored else None
            info = node.volume(record.volume_id) if node is not None else None
            if info is not None and info.staged:
                raise InUse(f"volume {record.volume_id} is still staged on {record.node_id}")
        tomb = record.replace(state=DELETING)
        ops: list[Put | Delete] = [Put(record.key, tomb.to_value(), expect=version)]
        name = self.store.get(VOLUME_NAME + record.name)
        if name is not None and name.value["object_id"] == record.volume_id:
            ops.append(Delete(VOLUME_NAME + record.name, expect=name.version))
        new_version = self.store.commit(ops)
        self.index.note(record.volume_id, tomb, new_version)
        return tomb, new_version

    def converge_deleted(self, tomb: VolumeRecord, version: int) -> bool:
        """Remove a tombstone's storage, then the tombstone. False while its node is away
        (the tombstone waits for it)."""
        if tomb.mirrored:
            if not self.mirrors.remove(tomb, version):
                return False
        else:
            node = self.nodes.get(tomb.node_id)
            if node is None:
                log.warning("volume %s deleted; its storage on %s goes when the node is back",
                            tomb.volume_id, tomb.node_id)
                return False
            node.delete_volume(tomb.volume_id, version)
        crash.point("delete-volume-after-engine")
        log.info("deleted volume %s (%s)", tomb.volume_id, tomb.name)
        self.index.storage_gone(tomb.volume_id, version)
        return self.remove_tombstone(tomb, version)

    def remove_tombstone(self, tomb: VolumeRecord, version: int) -> bool:
        """The tombstone's storage is gone: remove the tombstone itself (again, when an
        earlier sweep failed, e.g. while the store had no quorum)."""
        if self.sweeper is not None:
            self.sweeper.add(tomb.key, version)  # bookkeeping, off the request path
            return True
        try:
            revision = self.store.commit([Delete(tomb.key, expect=version)])
        except Conflict:
            return False  # someone else finished it
        self.index.note(tomb.volume_id, None, revision)
        return True

    def abandon_intent(self, record: VolumeRecord, version: int) -> None:
        """A CREATING record past its deadline becomes a tombstone (the reconciler)."""
        tomb, tomb_version = self._tombstone(record, version, check_use=False)
        log.warning("abandoning the creation of %s (%s): not confirmed in time",
                    record.volume_id, record.name)
        self.converge_deleted(tomb, tomb_version)

    # --- changes ---------------------------------------------------------------------
    def expand(self, volume_id: str, size_bytes: int) -> VolumeRecord:
        with self.locks.hold(volume_id):
            record, version = self.require_ready(volume_id)
            if record.mirrored:
                return self._expand_mirrored(record, version, size_bytes)
            node = self.nodes.require(record.node_id)
            before = record
            if size_bytes > record.capacity_bytes:
                self._check_growth(record, record.node_id, size_bytes)
                record = record.replace(capacity_bytes=size_bytes)
                version = self._save(record, version)
            # converge the node on the record (a retry after a failed node call lands here)
            try:
                node.expand_volume(volume_id, record.capacity_bytes, version)
            except Precondition:
                # the node's storage cannot grow at all (an NVMe namespace): the record
                # must not promise a size no retry will ever reach
                if record is not before:
                    self._save(before, version)
                raise
            return record

    def _check_growth(self, record: VolumeRecord, node_id: str, size_bytes: int) -> None:
        growth = size_bytes - record.capacity_bytes
        available = placement.available_bytes(self.nodes.info(node_id), self.index,
                                              self.policy.overcommit_ratio)
        if growth > available:
            raise OutOfCapacity(f"growing by {growth} bytes; {available} bytes "
                                f"available on {node_id}")

    def _expand_mirrored(self, record: VolumeRecord, version: int,
                         size_bytes: int) -> VolumeRecord:
        """Every replica grows (its pool volume, its maps), open or not; the frontend
        follows at NodeExpandVolume. A replica's node away refuses it (Unavailable, the
        resizer retries): nothing changed then. A retry after a partial growth converges."""
        self.mirrors.require_reachable(record)
        if size_bytes > record.capacity_bytes:
            for r in record.replicas:
                self._check_growth(record, r.node_id, size_bytes)
            record = record.replace(capacity_bytes=size_bytes)
            version = self._save(record, version)
        self.mirrors.expand(record, version)
        return record

    def modify(self, volume_id: str, mutable: dict[str, str],
               resolve: Callable[[dict[str, str], dict[str, str]], QosSpec]) -> None:
        with self.locks.hold(volume_id):
            record, version = self.require_ready(volume_id)
            merged = {**record.mutable_parameters, **mutable}
            qos = resolve(record.parameters, merged)
            nodes = [self.nodes.require(n) for n in record.node_ids]
            for node_id in record.node_ids:  # a minimum is paid on every replica's node
                # InvalidSpec: the minimum can never fit the node (INVALID_ARGUMENT);
                # OutOfCapacity: no room now, the resizer retries (RESOURCE_EXHAUSTED).
                policy.check_admission(self.nodes.info(node_id).iops_capacity,
                                       self.index.guaranteed(node_id), volume_id, qos)
            record = record.replace(mutable_parameters=merged, qos=qos)
            version = self._save(record, version)
            for node in nodes:
                node.set_qos(volume_id, qos, version)
            if record.mirrored:  # limits: where its pods are (the frontend's device)
                self.mirrors.set_consumers_qos(
                    record, version, [a.node_id for a in self.attachments(volume_id)])

    def _save(self, record: VolumeRecord, version: int) -> int:
        try:
            new_version = self.store.commit([Put(record.key, record.to_value(), expect=version)])
        except Conflict:
            raise Busy(f"volume {record.volume_id} changed meanwhile; retry") from None
        self.index.note(record.volume_id, record, new_version)
        return new_version

    # --- attachments -----------------------------------------------------------------
    def publish(self, volume_id: str, node_id: str, access_type: str,
                read_only: bool) -> dict[str, str]:
        """Record the attachment; returns the publish_context (a mirrored volume's new
        generation and its replicas' addresses)."""
        with self.locks.hold(volume_id):
            record, version = self.require_ready(volume_id)
            info = self.nodes.info(self.nodes.require_known(node_id).node_id)
            if access_type not in record.access_types:
                raise InvalidSpec(f"volume {volume_id} was created for "
                                  f"{', '.join(record.access_types)}")
            if not record.mirrored and node_id != record.node_id:
                raise InUse(f"volume {volume_id} is local to node {record.node_id}")
            if record.mirrored and info.zone not in record.access_zones:
                raise Precondition(
                    f"volume {volume_id} is reachable from zones "
                    f"{', '.join(record.access_zones)}, not from {info.zone} where node "
                    f"{node_id} is (remoteAccess lets pods run beyond the replicas' zones)")
            key = attachment_key(volume_id, node_id)
            current = self.store.get(key)
            if current is not None:
                if current.value["read_only"] != read_only:
                    raise AlreadyExists(f"volume {volume_id} is published to {node_id} with "
                                        f"readonly={current.value['read_only']}")
                return dict(current.value.get("publish_context", {}))
            if record.mirrored:
                others = [a.node_id for a in self.attachments(volume_id)]
                if others:
                    raise Precondition(f"volume {volume_id} is published to {others[0]}; "
                                       "it must be unpublished there first")
            if self.attached_count(node_id) >= self.policy.max_volumes_per_node:
                raise OutOfCapacity(f"node {node_id} has its maximum of "
                                    f"{self.policy.max_volumes_per_node} volumes attached")
            context = self.mirrors.fence_for(record, node_id, version) if record.mirrored \
                else {}
            attachment = AttachmentRecord(volume_id, node_id, read_only, self.clock(), context)
            try:
                self.store.commit([Put(key, _asdict(attachment), expect=0)])
            except Conflict:
                raise Busy(f"volume {volume_id} was published meanwhile; retry") from None
            return context

    def unpublish(self, volume_id: str, node_id: str) -> None:
        # A tombstone has no attachments (DeleteVolume refuses a published volume): on one
        # the reconciler is converging, the call answers OK at once, not ABORTED.
        with delete_lock(self.locks, volume_id, lambda: self._is_tombstone(volume_id),
                         wait_s=0.0) as held:
            if not held:
                return
            targets = [node_id] if node_id else [a.node_id for a in self.attachments(volume_id)]
            for target in targets:
                self.store.commit([Delete(attachment_key(volume_id, target))])

    def attached_count(self, node_id: str) -> int:
        return sum(1 for _, got in self.store.list(ATTACHMENT)
                   if got.value["node_id"] == node_id)


def _asked(req: VolumeRequest) -> dict:
    """What the request asked for, kept in the record for the retry rule."""
    return dict(capabilities=tuple(sorted(req.ask.capabilities)) if req.ask else (),
                created_mutable_parameters=dict(req.mutable_parameters),
                created_bytes=req.size_bytes)


def _asdict(attachment: AttachmentRecord) -> dict:
    return {"volume_id": attachment.volume_id, "node_id": attachment.node_id,
            "read_only": attachment.read_only, "attached_at": attachment.attached_at,
            "publish_context": dict(attachment.publish_context)}
