"""The cluster's records: what should exist, written before any storage is made.

Keys in the cluster store (control/store.py):
  volume/<volume_id>            VolumeRecord
  volume-name/<name>            NameRecord -> the volume_id a CreateVolume name holds
  attachment/<volume_id>/<node> AttachmentRecord (ControllerPublish)
  snapshot/<snapshot_id>        SnapshotRecord (a backup's: bkp:<target>:<backup id>)
  snapshot-name/<name>          NameRecord
  group/<group_id>              GroupRecord
  group-name/<name>             NameRecord

Life of a volume or snapshot record: CREATING (the intent: an ID and the request's hash,
no storage yet or not confirmed) -> READY (the node confirmed the storage) -> DELETING (a
tombstone: the only thing that ever allows a node to remove storage) -> gone once every
node holding storage confirmed its removal. IDs are random and never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from control.topology import TOPOLOGY_ZONE_KEY, node_segments
from engine.qos.tiers import QosSpec

CREATING, READY, DELETING = "creating", "ready", "deleting"

VOLUME, VOLUME_NAME, ATTACHMENT = "volume/", "volume-name/", "attachment/"
SNAPSHOT, SNAPSHOT_NAME = "snapshot/", "snapshot-name/"
GROUP, GROUP_NAME = "group/", "group-name/"


def new_volume_id() -> str:
    return f"vol-{uuid.uuid4().hex}"


def new_snapshot_id() -> str:
    return f"snap-{uuid.uuid4().hex}"


def new_group_id() -> str:
    return f"grp-{uuid.uuid4().hex}"


def request_hash(fields: dict[str, Any]) -> str:
    """A stable digest of what a Create* call asked for: a retry under the same name must
    match it exactly, anything else is another request (ALREADY_EXISTS)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_SCALARS = (str, int, float, bool, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> dict:
    """Dataclass -> JSON-able dict: tuples become lists, nested dataclasses dicts. (On the
    path of every create and delete: field names are looked up once per class, and the
    common scalar fields take one type check.)"""
    cls = type(value)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(value))
    out = {}
    for name in names:
        item = getattr(value, name)
        if type(item) in _SCALARS:
            pass
        elif isinstance(item, QosSpec | BackupState):
            item = dict(vars(item))  # flat
        elif isinstance(item, tuple):
            item = [list(i) if isinstance(i, tuple) else i for i in item]
        elif isinstance(item, dict):
            item = dict(item)
        out[name] = item
    return out


@dataclass(frozen=True)
class NameRecord:
    object_id: str
    request_hash: str


@dataclass(frozen=True)
class ReplicaPlacement:
    node_id: str
    zone: str
    address: str = ""  # its node's replica service, as the node answered at creation


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    name: str
    request_hash: str
    state: str
    capacity_bytes: int
    node_id: str
    zone: str
    access_types: tuple[str, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    mutable_parameters: dict[str, str] = field(default_factory=dict)
    qos: QosSpec = QosSpec()  # kept here once; the node keeps the copy it enforces
    source_kind: str = ""  # "", "volume" or "snapshot"
    source_id: str = ""
    created_at: float = 0.0
    intent_deadline: float = 0.0  # a CREATING record older than this becomes a tombstone
    # Mirrored volumes (replicas > 1): where each replica lives, in zone order of
    # placement (the first in the provisioner's preferred zone). node_id/zone are the
    # first replica's. Empty for a local volume.
    replicas: tuple[ReplicaPlacement, ...] = ()
    min_in_sync: int = 0  # replicas that must hold a write before it is acknowledged
    remote_access: bool = False  # pods may run in any zone asked for, not only replicas'
    access_zones: tuple[str, ...] = ()  # mirrored: the zones its pods may run in
    # replaced replicas whose storage is still on their node (gone when the node is back)
    retired_replicas: tuple[str, ...] = ()
    # What CreateVolume asked for, kept apart from the current state so that a retry of it
    # is recognised after an expansion or a tier change (control/idempotency.py).
    capabilities: tuple[tuple[str, str, str], ...] = ()  # (access type, mode, fs type)
    created_mutable_parameters: dict[str, str] = field(default_factory=dict)
    created_bytes: int = 0

    @property
    def key(self) -> str:
        return VOLUME + self.volume_id

    @property
    def mirrored(self) -> bool:
        return bool(self.replicas)

    @property
    def segments(self) -> list[dict[str, str]]:
        """Where the volume is reachable from, as topology segments."""
        if self.mirrored:  # zone-only: pods go next to a replica (or anywhere asked for)
            return [{TOPOLOGY_ZONE_KEY: z} for z in self.access_zones]
        return [node_segments(self.node_id, self.zone)]  # a local volume: one node

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Every node holding the volume's storage."""
        return tuple(r.node_id for r in self.replicas) or (self.node_id,)

    def to_value(self) -> dict:
        value = _plain(self)
        value["replicas"] = [dataclasses.asdict(r) for r in self.replicas]
        return value

    @classmethod
    def from_value(cls, value: dict) -> VolumeRecord:
        v = dict(value)
        v["access_types"] = tuple(v["access_types"])
        v["qos"] = QosSpec(**v["qos"])
        v["replicas"] = tuple(ReplicaPlacement(**r) for r in v.get("replicas", ()))
        v["access_zones"] = tuple(v.get("access_zones", ()))
        v["retired_replicas"] = tuple(v.get("retired_replicas", ()))
        v["capabilities"] = tuple(tuple(c) for c in v.get("capabilities", ()))
        return cls(**v)

    def replace(self, **changes: Any) -> VolumeRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AttachmentRecord:
    volume_id: str
    node_id: str
    read_only: bool
    attached_at: float
    publish_context: dict[str, str] = field(default_factory=dict)  # as answered: a repeat

    @property
    def key(self) -> str:
        return attachment_key(self.volume_id, self.node_id)


def attachment_key(volume_id: str, node_id: str) -> str:
    return f"{ATTACHMENT}{volume_id}/{node_id}"


UPLOADING, UPLOADED = "uploading", "uploaded"  # a backup's phases


@dataclass(frozen=True)
class BackupState:
    """A snapshot that is also a backup (VolumeSnapshotClass `backupTarget`): its local
    snapshot is uploaded by its node; ready_to_use once the upload is durable."""

    target: str
    backup_id: str
    phase: str = UPLOADING  # UPLOADING -> UPLOADED
    base_snapshot_id: str = ""  # the incremental's base (a backup of the same volume)
    base_backup_id: str = ""
    base_chosen: bool = False  # base fixed (possibly none) before the upload started
    local: bool = True  # its local snapshot is kept (the base for the next incremental)
    # a tombstone's: the bucket no longer holds it (what is left is its node's part)
    removed: bool = False
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_uploaded: int = 0
    last_error: str = ""

    def replace(self, **changes: Any) -> BackupState:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One copy of a mirrored volume's snapshot: a snapshot of the replica on that node."""

    node_id: str
    snapshot_id: str  # the node's own ID of it


@dataclass(frozen=True)
class SnapshotRecord:
    snapshot_id: str
    name: str
    request_hash: str
    state: str
    source_volume_id: str
    node_id: str
    size_bytes: int = 0
    created_at: float = 0.0
    group_id: str = ""
    intent_deadline: float = 0.0
    # A mirrored volume's snapshot: one copy per replica taken at one write barrier, so a
    # restore from any is the same image (node_id is the first's). CREATING: every node
    # where a copy may be made (a tombstone removes them all); READY: the copies.
    replicas: tuple[ReplicaSnapshot, ...] = ()
    backup: BackupState | None = None

    @property
    def key(self) -> str:
        return SNAPSHOT + self.snapshot_id

    @property
    def mirrored(self) -> bool:
        return bool(self.replicas)

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Every node holding a copy."""
        return tuple(r.node_id for r in self.replicas) or (self.node_id,)

    @property
    def ready_to_use(self) -> bool:
        return self.backup is None or self.backup.phase == UPLOADED

    def to_value(self) -> dict:
        value = _plain(self)
        value["replicas"] = [dataclasses.asdict(r) for r in self.replicas]
        return value

    @classmethod
    def from_value(cls, value: dict) -> SnapshotRecord:
        v = dict(value)
        v["replicas"] = tuple(ReplicaSnapshot(**r) for r in v.get("replicas", ()))
        if v.get("backup"):
            v["backup"] = BackupState(**v["backup"])
        return cls(**v)

    def replace(self, **changes: Any) -> SnapshotRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    name: str
    request_hash: str
    state: str
    snapshot_ids: tuple[str, ...]
    volume_ids: tuple[str, ...]
    node_id: str
    created_at: float = 0.0
    intent_deadline: float = 0.0

    @property
    def key(self) -> str:
        return GROUP + self.group_id

    def to_value(self) -> dict:
        return _plain(self)

    @classmethod
    def from_value(cls, value: dict) -> GroupRecord:
        v = dict(value)
        v["snapshot_ids"], v["volume_ids"] = tuple(v["snapshot_ids"]), tuple(v["volume_ids"])
        return cls(**v)

    def replace(self, **changes: Any) -> GroupRecord:
        return dataclasses.replace(self, **changes)


class _Listable(Protocol):
    def list(self, prefix: str = "", *, after: str = "", limit: int = 0) -> list: ...


R = TypeVar("R")


def page(store: _Listable, prefix: str, after_id: str, limit: int,
         decode: Callable[[dict], R], keep: Callable[[R], bool],
         id_of: Callable[[R], str]) -> tuple[list[R], str]:
    """One page of the records under prefix that `keep` accepts, in ID order after
    `after_id`; returns (page, the last ID when more follow, else ""). Records it skips
    (intents, tombstones, other filters) never shorten a page."""
    out: list[R] = []
    cursor = prefix + after_id if after_id else ""
    while True:
        batch = store.list(prefix, after=cursor, limit=limit + 1 if limit else 0)
        for key, got in batch:
            record = decode(got.value)
            if keep(record):
                out.append(record)
            cursor = key
        if not limit or len(out) > limit or len(batch) < limit + 1:
            break
    if limit and len(out) > limit:
        return out[:limit], id_of(out[limit - 1])
    return out, ""
