"""The controller's records: volumes, their names, and their attachments to nodes.

Kinds in the store:
  volume      key volume_id            -> VolumeRecord fields
  volume-name key name                 -> {"volume_id": ...}   (the idempotency index)
  attachment  key volume_id|node_id    -> {"read_only": bool}
A volume's record is written only once its storage exists (and removed before its storage
goes), so a listed volume is always a whole one; start-up removes storage no record owns.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field

from engine.state import Store

VOLUME, VOLUME_NAME, ATTACHMENT = "volume", "volume-name", "attachment"


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    name: str
    capacity_bytes: int
    node_id: str
    zone: str
    access_types: tuple[str, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    mutable_parameters: dict[str, str] = field(default_factory=dict)
    qos_json: str = ""
    source_kind: str = ""  # "", "volume" or "snapshot"
    source_id: str = ""
    created_at: float = 0.0
    # What CreateVolume asked for, kept apart from the current state so that a retry of it
    # is recognised after an expansion or a tier change (csi/idempotency.py). Records from
    # before these were kept load with the defaults.
    capabilities: tuple[tuple[str, str, str], ...] = ()  # (access type, mode, fs type)
    created_mutable_parameters: dict[str, str] | None = None
    created_bytes: int = 0

    def to_record(self) -> dict:
        rec = dataclasses.asdict(self)
        rec["access_types"] = list(self.access_types)
        rec["capabilities"] = [list(c) for c in self.capabilities]
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> VolumeRecord:
        rec = dict(rec)
        rec["access_types"] = tuple(rec["access_types"])
        rec["capabilities"] = tuple(tuple(c) for c in rec.get("capabilities", ()))
        return cls(**rec)

    def replace(self, **changes) -> VolumeRecord:
        return dataclasses.replace(self, **changes)


def new_volume_id() -> str:
    return f"vol-{uuid.uuid4().hex}"


def _attach_key(volume_id: str, node_id: str) -> str:
    return f"{volume_id}|{node_id}"


class Catalog:
    def __init__(self, store: Store):
        self.store = store
        # Bytes promised per node, kept incrementally: CreateVolume needs it on every
        # call and summing 1,000 records each time would dominate its cost.
        self._lock = threading.Lock()
        self._provisioned: dict[str, int] | None = None

    def _account(self, node_id: str, delta: int) -> None:
        with self._lock:
            if self._provisioned is not None:
                self._provisioned[node_id] = self._provisioned.get(node_id, 0) + delta

    # --- volumes -----------------------------------------------------------------
    def volume(self, volume_id: str) -> VolumeRecord | None:
        rec = self.store.get(VOLUME, volume_id)
        return VolumeRecord.from_record(rec) if rec else None

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        ref = self.store.get(VOLUME_NAME, name)
        return self.volume(ref["volume_id"]) if ref else None

    def add(self, vol: VolumeRecord) -> None:
        with self.store.txn() as t:
            t.put(VOLUME, vol.volume_id, vol.to_record())
            t.put(VOLUME_NAME, vol.name, {"volume_id": vol.volume_id})
        self._account(vol.node_id, vol.capacity_bytes)

    def save(self, vol: VolumeRecord) -> None:
        with self.store.txn() as t:
            old = t.get(VOLUME, vol.volume_id)
            t.put(VOLUME, vol.volume_id, vol.to_record())
        before = old["capacity_bytes"] if old else 0
        if vol.capacity_bytes != before:
            self._account(vol.node_id, vol.capacity_bytes - before)

    def forget(self, vol: VolumeRecord) -> None:
        with self.store.txn() as t:
            old = t.get(VOLUME, vol.volume_id)
            t.delete(VOLUME, vol.volume_id)
            ref = t.get(VOLUME_NAME, vol.name)
            if ref is not None and ref["volume_id"] == vol.volume_id:
                t.delete(VOLUME_NAME, vol.name)
        if old is not None:
            self._account(vol.node_id, -old["capacity_bytes"])

    def volumes(self, *, after: str = "", limit: int = 0) -> list[VolumeRecord]:
        """Volumes in ID order, starting after `after`."""
        return [VolumeRecord.from_record(r)
                for _, r in self.store.list(VOLUME, after=after, limit=limit)]

    def provisioned_bytes(self, node_id: str) -> int:
        with self._lock:
            if self._provisioned is None:
                totals: dict[str, int] = {}
                for v in self.volumes():
                    totals[v.node_id] = totals.get(v.node_id, 0) + v.capacity_bytes
                self._provisioned = totals
            return self._provisioned.get(node_id, 0)

    # --- attachments ---------------------------------------------------------------
    def attachment(self, volume_id: str, node_id: str) -> dict | None:
        return self.store.get(ATTACHMENT, _attach_key(volume_id, node_id))

    def attachments_of(self, volume_id: str) -> dict[str, dict]:
        return {
            key.split("|", 1)[1]: rec
            for key, rec in self.store.list(ATTACHMENT, prefix=f"{volume_id}|")
        }

    def attached_volume_count(self, node_id: str) -> int:
        return sum(1 for key, _ in self.store.list(ATTACHMENT) if key.split("|", 1)[1] == node_id)

    def attach(self, volume_id: str, node_id: str, read_only: bool) -> None:
        self.store.put(ATTACHMENT, _attach_key(volume_id, node_id),
                       {"read_only": read_only, "at": time.time()})

    def detach(self, volume_id: str, node_id: str) -> None:
        self.store.delete(ATTACHMENT, _attach_key(volume_id, node_id))
