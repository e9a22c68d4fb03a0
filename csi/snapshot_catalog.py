"""The controller's snapshot records.

Kinds in the store:
  snapshot             key snapshot_id -> SnapshotRecord fields
  snapshot-name        key name        -> {"snapshot_id": ...}
  group-snapshot       key group_id    -> GroupRecord fields
  group-snapshot-name  key name        -> {"group_id": ...}
Storage is made first and recorded second (start-up removes storage no record owns).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from engine.state import Store

SNAPSHOT, SNAPSHOT_NAME = "snapshot", "snapshot-name"
GROUP, GROUP_NAME = "group-snapshot", "group-snapshot-name"


@dataclass(frozen=True)
class SnapshotRecord:
    snapshot_id: str
    name: str
    source_volume_id: str
    node_id: str
    size_bytes: int
    created_at: float
    group_id: str = ""


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    name: str
    snapshot_ids: tuple[str, ...]
    volume_ids: tuple[str, ...]
    created_at: float


def new_snapshot_id() -> str:
    return f"snap-{uuid.uuid4().hex}"


def new_group_id() -> str:
    return f"grp-{uuid.uuid4().hex}"


class SnapshotCatalog:
    def __init__(self, store: Store):
        self.store = store

    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        rec = self.store.get(SNAPSHOT, snapshot_id)
        return SnapshotRecord(**rec) if rec else None

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        ref = self.store.get(SNAPSHOT_NAME, name)
        return self.snapshot(ref["snapshot_id"]) if ref else None

    def snapshots(self, *, after: str = "", limit: int = 0) -> list[SnapshotRecord]:
        return [SnapshotRecord(**r) for _, r in self.store.list(SNAPSHOT, after=after, limit=limit)]

    def add_snapshots(self, snaps: list[SnapshotRecord], group: GroupRecord | None = None) -> None:
        with self.store.txn() as t:
            for snap in snaps:
                t.put(SNAPSHOT, snap.snapshot_id, dataclasses.asdict(snap))
                if snap.name:
                    t.put(SNAPSHOT_NAME, snap.name, {"snapshot_id": snap.snapshot_id})
            if group is not None:
                rec = dataclasses.asdict(group)
                rec["snapshot_ids"], rec["volume_ids"] = list(group.snapshot_ids), list(
                    group.volume_ids)
                t.put(GROUP, group.group_id, rec)
                t.put(GROUP_NAME, group.name, {"group_id": group.group_id})

    def forget_snapshot(self, snap: SnapshotRecord) -> None:
        with self.store.txn() as t:
            t.delete(SNAPSHOT, snap.snapshot_id)
            ref = t.get(SNAPSHOT_NAME, snap.name) if snap.name else None
            if ref is not None and ref["snapshot_id"] == snap.snapshot_id:
                t.delete(SNAPSHOT_NAME, snap.name)

    def group(self, group_id: str) -> GroupRecord | None:
        rec = self.store.get(GROUP, group_id)
        if rec is None:
            return None
        rec["snapshot_ids"], rec["volume_ids"] = tuple(rec["snapshot_ids"]), tuple(
            rec["volume_ids"])
        return GroupRecord(**rec)

    def group_by_name(self, name: str) -> GroupRecord | None:
        ref = self.store.get(GROUP_NAME, name)
        return self.group(ref["group_id"]) if ref else None

    def forget_group(self, group: GroupRecord) -> None:
        with self.store.txn() as t:
            t.delete(GROUP, group.group_id)
            ref = t.get(GROUP_NAME, group.name)
            if ref is not None and ref["group_id"] == group.group_id:
                t.delete(GROUP_NAME, group.name)
