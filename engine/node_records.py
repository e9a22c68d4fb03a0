"""Node-local records: their fields, their JSON layout, their store kinds and keys.

The only module that knows how these records look in the node's state store
(engine/state.py); everyone else reads and writes the typed values below through
`NodeRecords`:

  stage/<volume_id>                 StageRecord    the volume's device (and filesystem)
  publish/<volume_id>|<target>      PublishRecord  one target path of the volume
  freeze/<mount_point>              FreezeRecord   a filesystem frozen for a snapshot

Nodes upgrade in place, so the JSON field names never change, and a field added later is
optional: a record written before it existed reads with its default. Stage and publish
records are written PENDING before the first side effect and DONE after the last, so a
restart can roll back what a crash cut short.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from engine.state import Record, Store

STAGE_KIND, PUBLISH_KIND = "stage", "publish"
FREEZE_KIND = "freeze"

Device = tuple[int, int]  # a block device's (major, minor)


class RecordState(enum.Enum):
    PENDING = "pending"  # intent recorded; its side effects may be partly done
    DONE = "done"  # every side effect done


PENDING, DONE = RecordState.PENDING, RecordState.DONE


def _parse_device(text: str) -> Device | None:
    """"major:minor" as records keep it ("" when unknown)."""
    if not text:
        return None
    major, minor = text.split(":")
    return int(major), int(minor)


def format_device(device: Device | None) -> str:
    return f"{device[0]}:{device[1]}" if device else ""


def _required(rec: Record, field: str, kind: str, key: str) -> Any:
    try:
        return rec[field]
    except KeyError:
        raise ValueError(f"{kind} record {key!r} has no {field!r} field") from None


@dataclass(frozen=True)
class StageRecord:
    volume_id: str  # the key, not in the JSON
    staging_path: str  # normalised
    access_type: str  # "mount" or "block"
    read_only: bool  # reader-only access modes mount the filesystem ro
    fs_type: str = ""  # "" for block
    mount_flags: tuple[str, ...] = ()  # not kept by the first releases
    state: RecordState = PENDING

    @property
    def done(self) -> bool:
        return self.state is DONE

    @classmethod
    def from_record(cls, volume_id: str, rec: Record) -> StageRecord:
        return cls(
            volume_id=volume_id,
            staging_path=_required(rec, "staging_path", STAGE_KIND, volume_id),
            access_type=_required(rec, "access_type", STAGE_KIND, volume_id),
            fs_type=rec.get("fs_type", ""),
            mount_flags=tuple(rec.get("mount_flags", ())),
            read_only=bool(_required(rec, "read_only", STAGE_KIND, volume_id)),
            state=RecordState(_required(rec, "state", STAGE_KIND, volume_id)),
        )

    def to_record(self) -> Record:
        return {
            "staging_path": self.staging_path, "access_type": self.access_type,
            "fs_type": self.fs_type, "mount_flags": list(self.mount_flags),
            "read_only": self.read_only, "state": self.state.value,
        }


def _publish_key(volume_id: str, target: str) -> str:
    return f"{volume_id}|{os.path.normpath(target)}"


def _publish_prefix(volume_id: str) -> str:
    return f"{volume_id}|"


@dataclass(frozen=True)
class PublishRecord:
    volume_id: str
    target: str  # normalised
    access_type: str  # "mount" or "block"
    read_only: bool
    ro_device: str = ""  # a block publish's read-only loop device (/dev/loopN), if any
    pod_uid: str = ""  # the pod it is published to, when the CO said (for its QoS rules)
    device: Device | None = None  # what the pod does its I/O on; known once DONE
    state: RecordState = PENDING

    @property
    def done(self) -> bool:
        return self.state is DONE

    @classmethod
    def from_record(cls, key: str, rec: Record) -> PublishRecord:
        return cls(
            volume_id=_required(rec, "volume_id", PUBLISH_KIND, key),
            target=_required(rec, "target", PUBLISH_KIND, key),
            access_type=_required(rec, "access_type", PUBLISH_KIND, key),
            read_only=bool(_required(rec, "read_only", PUBLISH_KIND, key)),
            ro_device=rec.get("ro_device", ""),
            pod_uid=rec.get("pod_uid", ""),
            device=_parse_device(rec.get("device", "")),
            state=RecordState(_required(rec, "state", PUBLISH_KIND, key)),
        )

    def to_record(self) -> Record:
        rec: Record = {
            "volume_id": self.volume_id, "target": self.target,
            "access_type": self.access_type, "read_only": self.read_only,
            "ro_device": self.ro_device, "pod_uid": self.pod_uid, "state": self.state.value,
        }
        if self.device is not None:  # absent until known, as it always was
            rec["device"] = format_device(self.device)
        return rec


@dataclass(frozen=True)
class FreezeRecord:
    mount_point: str  # the key, not in the JSON
    frozen_at: float  # time.time() when the freeze began (JSON "at")
    pid: int  # the process that froze it

    @classmethod
    def from_record(cls, mount_point: str, rec: Record) -> FreezeRecord:
        return cls(mount_point, float(rec.get("at", 0.0)), int(rec.get("pid", 0)))

    def to_record(self) -> Record:
        return {"at": self.frozen_at, "pid": self.pid}


class NodeRecords:
    """Typed get/put/delete/list of the node-local records in one state store."""

    def __init__(self, store: Store):
        self.store = store

    # --- stage ---------------------------------------------------------------------
    def get_stage(self, volume_id: str) -> StageRecord | None:
        rec = self.store.get(STAGE_KIND, volume_id)
        return StageRecord.from_record(volume_id, rec) if rec is not None else None

    def put_stage(self, stage: StageRecord) -> None:
        self.store.put(STAGE_KIND, stage.volume_id, stage.to_record())

    def delete_stage(self, volume_id: str) -> None:
        self.store.delete(STAGE_KIND, volume_id)

    def list_stages(self) -> list[StageRecord]:
        return [StageRecord.from_record(k, r) for k, r in self.store.list(STAGE_KIND)]

    # --- publish -------------------------------------------------------------------
    def get_publish(self, volume_id: str, target: str) -> PublishRecord | None:
        key = _publish_key(volume_id, target)
        rec = self.store.get(PUBLISH_KIND, key)
        return PublishRecord.from_record(key, rec) if rec is not None else None

    def put_publish(self, publish: PublishRecord) -> None:
        self.store.put(PUBLISH_KIND, _publish_key(publish.volume_id, publish.target),
                       publish.to_record())

    def delete_publish(self, volume_id: str, target: str) -> None:
        self.store.delete(PUBLISH_KIND, _publish_key(volume_id, target))

    def publishes_of(self, volume_id: str) -> list[PublishRecord]:
        """The volume's publish records, by target."""
        return [PublishRecord.from_record(k, r)
                for k, r in self.store.list(PUBLISH_KIND, prefix=_publish_prefix(volume_id))]

    def list_publishes(self) -> list[PublishRecord]:
        return [PublishRecord.from_record(k, r) for k, r in self.store.list(PUBLISH_KIND)]

    # --- freeze --------------------------------------------------------------------
    def put_freeze(self, freeze: FreezeRecord) -> None:
        self.store.put(FREEZE_KIND, freeze.mount_point, freeze.to_record())

    def delete_freeze(self, mount_point: str) -> None:
        self.store.delete(FREEZE_KIND, mount_point)

    def list_freezes(self) -> list[FreezeRecord]:
        return [FreezeRecord.from_record(k, r) for k, r in self.store.list(FREEZE_KIND)]

    # --- pool info -----------------------------------------------------------------
