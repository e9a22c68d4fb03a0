"""The mirror's arbiter on the cluster store: one record per mirrored volume, `arbiter/<id>`.

mirror.arbiter.Arbiter asks for get() and compare_and_set(); the cluster store already
offers versioned records and guarded commits (control/store.py), so in a cluster the
arbiter is etcd, behind the same contract the controller's records use. The record's
version is the store version (etcd's mod_revision): a CAS token, never reused.

Who writes it: the controller creates it with a mirrored volume (generation 0, every
replica in sync: they are all empty), bumps the generation at every ControllerPublish
(attach = fence), and records replicas it could not fence as out of sync; the frontend
takes ownership at the published generation and records replicas it drops or repairs.
Timeouts and lost connections raise Unavailable (the frontend keeps I/O held and retries),
never a guess.
"""

from __future__ import annotations

from control.store import Conflict, Put, Store
from engine.errors import NotFound
from mirror.arbiter import VolumeRecord

PREFIX = "arbiter/"


def key(volume_id: str) -> str:
    return PREFIX + volume_id


def _value(record: VolumeRecord) -> dict:
    return {"volume_id": record.volume_id, "generation": record.generation,
            "owner": record.owner, "replicas": dict(record.replicas)}


class StoreArbiter:
    def __init__(self, store: Store):
        self.store = store

    def get(self, volume_id: str) -> VolumeRecord:
        """Raises NotFound (no record), Unavailable (store unreachable)."""
        got = self.store.get(key(volume_id))
        if got is None:
            raise NotFound(f"no arbiter record for {volume_id}")
        v = got.value
        return VolumeRecord(v["volume_id"], v["generation"], v["owner"], dict(v["replicas"]),
                            got.version)

    def compare_and_set(self, record: VolumeRecord,
                        expected_version: int) -> VolumeRecord | None:
        try:
            version = self.store.commit([Put(key(record.volume_id), _value(record),
                                             expect=expected_version)])
        except Conflict:
            return None
        return VolumeRecord(record.volume_id, record.generation, record.owner,
                            dict(record.replicas), version)
