"""Mirrored volumes staged on this node: their records and their devices, from frontends.

At NodeStage the node learns from the publish_context what the controller decided at
attach (the generation, the replicas' addresses, the volume's size) and records it here
(node-local kind "frontend-volume"); the stage then asks for the volume's device as for
any volume, and this backend starts (or adopts) the volume's frontend for it. NodeUnstage
releases the device: the frontend stops cleanly (its activity log emptied, its lease
ends with state "stopped") and the record goes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from control.node_mirror import FrontendHost
from engine.backend import Device
from engine.errors import Busy, NotFound, Precondition, Unavailable
from engine.loopdev import LoopDevices
from engine.routed_backend import FRONTEND
from engine.state import Store
from engine.volumes import MIRROR_SECTOR_BYTES, Backing
from mirror import auth
from mirror.client import ReplicaClient, ReplicaError
from mirror.frontend import FILE_NAME
from mirror.spec import ReplicaAddr

KIND = "frontend-volume"
# the volume's tier here ({qos_json, version}), apart from the stage's record: the
# controller may set it between attach and stage (ModifyVolume), and a newer one wins
QOS_KIND = "frontend-qos"
# a snapshot's write barrier while nothing serves the volume here ({token, until}: wall
# clock): staging waits (Busy) so no frontend starts writing in the middle of it
HOLD_KIND = "frontend-hold"
SECTOR_BYTES = MIRROR_SECTOR_BYTES  # the frontend's loop device (direct I/O on the FUSE file)


@dataclass(frozen=True)
class FrontendVolume:
    """What the node knows of a mirrored volume it stages (from the publish_context)."""

    volume_id: str
    size_bytes: int
    replicas: tuple[str, ...]  # "node@host:port"
    generation: int
    min_in_sync: int
    access_types: tuple[str, ...] = ()
    made_fs: str = ""
    made_fs_done: bool = False
    qos_json: str = ""
    created_at: float = 0.0

    def backing(self) -> Backing:
        return Backing(self.volume_id, "", self.size_bytes, SECTOR_BYTES, self.created_at,
                       qos_json=self.qos_json, access_types=self.access_types,
                       made_fs=self.made_fs, made_fs_done=self.made_fs_done, role=FRONTEND)

    def addrs(self) -> list[ReplicaAddr]:
        return [ReplicaAddr.parse(r) for r in self.replicas]


class FrontendBackend:
    def __init__(self, store: Store, host: FrontendHost, node_id: str,
                 loops: LoopDevices | None = None):
        self.store = store
        self.host = host
        self.node_id = node_id
        self.loops = loops or LoopDevices()

    # --- records -----------------------------------------------------------------------
    def record(self, volume_id: str) -> FrontendVolume | None:
        rec = self.store.get(KIND, volume_id)
        if rec is None:
            return None
        rec["replicas"] = tuple(rec["replicas"])
        rec["access_types"] = tuple(rec.get("access_types", ()))
        return FrontendVolume(**rec)

    def prepare(self, volume: FrontendVolume, qos_json: str = "", qos_version: int = 0) -> None:
        """Record (or update, at a newer generation) what NodeStage was told; qos_json:
        the tier ControllerPublish gave (a newer one set meanwhile is kept)."""
        if qos_json:
            self.set_qos(volume.volume_id, qos_json, qos_version)
        self._put(volume)

    def _put(self, volume: FrontendVolume) -> None:
        current = self.record(volume.volume_id)
        if current is not None:  # keep what the node made of it (its filesystem, its tier)
            volume = dataclasses.replace(volume, made_fs=current.made_fs,
                                         made_fs_done=current.made_fs_done,
                                         qos_json=current.qos_json,
                                         created_at=current.created_at)
        else:
            volume = dataclasses.replace(volume, created_at=time.time())
        rec = dataclasses.asdict(volume)
        rec["replicas"], rec["access_types"] = list(volume.replicas), list(volume.access_types)
        self.store.put(KIND, volume.volume_id, rec)

    def forget(self, volume_id: str) -> None:
        with self.store.txn() as t:
            for kind in (KIND, QOS_KIND, HOLD_KIND):
                t.delete(kind, volume_id)

    def get(self, volume_id: str) -> Backing | None:
        rec = self.record(volume_id)
        if rec is None:
            return None
        qos = self.store.get(QOS_KIND, volume_id)
        return dataclasses.replace(rec, qos_json=qos["qos_json"]).backing() if qos \
            else rec.backing()

    def _update(self, volume_id: str, **changes: object) -> FrontendVolume:
        rec = self.record(volume_id)
        if rec is None:
            raise NotFound(f"mirrored volume {volume_id} is not staged on {self.node_id}")
        rec = dataclasses.replace(rec, **changes)  # type: ignore[arg-type]
        self._put(rec)
        return rec

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing:
        self._update(volume_id, made_fs=fs_type, made_fs_done=done)
        return self._require(volume_id).backing()

    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None:
        """The volume's tier here, staged or not yet (an older version never overwrites a
        newer one: a ModifyVolume between attach and stage outlives the attach's tier)."""
        with self.store.txn() as t:
            current = t.get(QOS_KIND, volume_id)
            if current is not None and version < current.get("version", 0):
                return
            t.put(QOS_KIND, volume_id, {"qos_json": qos_json, "version": version})

    # --- a snapshot's write barrier while nothing serves the volume here ----------------
    def hold_stage(self, volume_id: str, token: str, hold_s: float) -> None:
        self.store.put(HOLD_KIND, volume_id, {"token": token, "until": time.time() + hold_s})

    def release_stage(self, volume_id: str, token: str) -> bool:
        """True when that hold was still in force."""
        with self.store.txn() as t:
            hold = t.get(HOLD_KIND, volume_id)
            if hold is None or hold["token"] != token:
                return False
            t.delete(HOLD_KIND, volume_id)
        return time.time() < hold["until"]

    def _check_stage_hold(self, volume_id: str) -> None:
        hold = self.store.get(HOLD_KIND, volume_id)
        if hold is not None and time.time() < hold["until"]:
            raise Busy(f"a snapshot of {volume_id} holds its writes for "
                       f"{hold['until'] - time.time():.0f} s more; retry")

    def _require(self, volume_id: str) -> FrontendVolume:
        rec = self.record(volume_id)
        if rec is None:
            raise NotFound(f"mirrored volume {volume_id} is not staged on {self.node_id}")
        return rec

    def set_replicas(self, volume_id: str, replicas: tuple[str, ...]) -> bool:
        """A replica replaced (self-healing): the running frontend and the record (which a
        restarted frontend starts from) learn the new set."""
        if self.record(volume_id) is None:
            return False
        self._update(volume_id, replicas=tuple(replicas))
        return self.host.set_replicas(volume_id, [ReplicaAddr.parse(r) for r in replicas])

    # --- devices -----------------------------------------------------------------------
    def _file(self, volume_id: str) -> str:
        return f"{self.host.frontends_dir}/{volume_id}/mnt/{FILE_NAME}"

    def devices(self, backing: Backing) -> list[Device]:
        try:
            return list(self.loops.by_backing_file(self._file(backing.volume_id)))
        except OSError:  # the FUSE mount is gone: no device
            return []

    def attach(self, backing: Backing, *, read_only: bool = False) -> Device:
        rec = self._require(backing.volume_id)
        if not read_only:
            self._check_stage_hold(rec.volume_id)
        if read_only:  # a device the kernel itself refuses writes through
            if not self.devices(backing):
                raise Unavailable(f"the frontend of {backing.volume_id} is not running")
            return self.loops.attach(self._file(backing.volume_id), read_only=True,
                                     sector_size_bytes=SECTOR_BYTES, strict_direct_io=False)
        local = next((a.replica_id for a in rec.addrs() if a.replica_id == self.node_id), None)
        path = self.host.ensure(rec.volume_id, rec.size_bytes, rec.addrs(), rec.generation,
                                rec.min_in_sync, preferred_replica=local)
        dev = self.loops.by_path(path)
        if dev is None:
            raise Unavailable(f"the frontend of {rec.volume_id} has no device")
        return dev

    def release(self, backing: Backing, dev: Device, *, require_released: bool = False) -> None:
        if dev.read_only:
            self.loops.detach(dev.path)
        else:  # the frontend goes with its device: a clean stop
            self.host.stop(backing.volume_id)

    def refreshed(self, backing: Backing, dev: Device) -> Device:
        """NodeExpandVolume: the frontend grows to the size its replicas have now (the
        controller grew every one first), then the loop device to the FUSE file's."""
        rec = self._require(backing.volume_id)
        size = self._replicas_bytes(rec)
        if size > rec.size_bytes:
            self.host.grow(rec.volume_id, size)
            self._update(rec.volume_id, size_bytes=size)
        os.stat(self._file(rec.volume_id))  # the kernel asks the file's size again
        if dev.size_bytes != max(size, rec.size_bytes):
            return self.loops.refresh_capacity(dev.path)
        return dev

    def _replicas_bytes(self, rec: FrontendVolume) -> int:
        """The size every reachable replica has (the smallest one's)."""
        key = auth.load_key(self.host.key_path)
        sizes, errors = [], []
        for addr in rec.addrs():
            try:
                with ReplicaClient(addr, key, 5.0) as c:
                    sizes.append(int(c.open(rec.volume_id, rec.generation)["size_bytes"]))
            except (ReplicaError, OSError, Unavailable) as e:
                errors.append(f"{addr.replica_id}: {e}")
        if not sizes:
            raise Unavailable(f"no replica of {rec.volume_id} answered its size: "
                              + "; ".join(errors))
        return min(sizes)

    def still_holds(self, backing: Backing, dev: Device) -> bool:
        return any(d.path == dev.path for d in self.devices(backing))

    def holds_data(self, backing: Backing, dev: Device) -> bool:
        """Asked of a replica (HAS_DATA: any data extent). Unanswerable: say yes, so
        nothing is ever formatted over data nobody could check."""
        rec = self._require(backing.volume_id)
        key = auth.load_key(self.host.key_path)
        for addr in rec.addrs():
            try:
                with ReplicaClient(addr, key, 5.0) as c:
                    c.open(rec.volume_id, rec.generation, writer=False)
                    return c.has_data()
            except (ReplicaError, OSError, Unavailable):
                continue
        return True

    def storage_missing(self, backing: Backing) -> str:
        if self.record(backing.volume_id) is None:
            raise Precondition(f"mirrored volume {backing.volume_id} is not staged here")
        return ""
