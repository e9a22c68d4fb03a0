"""Per-node sums over the volume records, for placement and admission.

CreateVolume needs each candidate node's promised bytes and guaranteed IOPS on every
call, and summing thousands of records each time would dominate its cost. The index is
loaded once from the store and then kept current from the controller's own commits and
from the store's watch (other controllers' commits). Intents and tombstones count: their
storage exists or may exist. Each entry remembers the store revision it came from, so an
older event never overwrites a newer one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from control.records import VOLUME, VolumeRecord
from engine.qos.tiers import QosSpec


@dataclass(frozen=True)
class _Entry:
    revision: int
    node_ids: tuple[str, ...]  # a mirrored volume costs its bytes and minima on each
    capacity_bytes: int
    qos: QosSpec


class VolumeIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._gone: dict[str, int] = {}  # volume_id -> revision of its removal

    def note(self, volume_id: str, record: VolumeRecord | None, revision: int) -> None:
        """A volume record as of `revision` (None: removed at that revision)."""
        with self._lock:
            current = self._entries.get(volume_id)
            newest = max(current.revision if current else 0, self._gone.get(volume_id, 0))
            if revision <= newest:
                return
            if record is None:
                self._entries.pop(volume_id, None)
                self._gone[volume_id] = revision
            else:
                self._entries[volume_id] = _Entry(revision,
                                                  record.node_ids + record.retired_replicas,
                                                  record.capacity_bytes, record.qos)

    def storage_gone(self, volume_id: str, revision: int) -> None:
        """The tombstone at `revision` has done its job (its node removed the storage):
        the volume costs nothing any more, even before the tombstone itself is removed."""
        with self._lock:
            current = self._entries.get(volume_id)
            if current is not None and current.revision <= revision:
                del self._entries[volume_id]
                self._gone[volume_id] = revision

    def storage_removed(self, volume_id: str, revision: int) -> bool:
        """True if this controller saw the storage of the tombstone at `revision` go (the
        tombstone only waits for its sweep)."""
        with self._lock:
            return self._gone.get(volume_id, 0) >= revision

    def note_value(self, key: str, value: dict | None, revision: int) -> None:
        """The same, from a raw store event."""
        if key.startswith(VOLUME):
            record = VolumeRecord.from_value(value) if value is not None else None
            self.note(key[len(VOLUME):], record, revision)

    def provisioned_bytes(self, node_id: str) -> int:
        with self._lock:
            return sum(e.capacity_bytes for e in self._entries.values() if node_id in e.node_ids)

    def guaranteed(self, node_id: str) -> dict[str, QosSpec]:
        """The QoS specs of the volumes on node that guarantee a minimum."""
        with self._lock:
            return {vid: e.qos for vid, e in self._entries.items()
                    if node_id in e.node_ids and e.qos.min_iops}
