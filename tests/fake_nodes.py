"""In-memory nodes behind the node API, for controller unit tests without root.

They keep the node API's contract (idempotent calls, stale versions refused, staged
volumes not deletable) so controller logic is tested against the same rules a real node
enforces; the real node is tested against the same contract in tests/integration.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from control.node_api import (
    JOB_DONE,
    JOB_RUNNING,
    BackupJob,
    ByteRange,
    Condition,
    Inventory,
    JobStatus,
    NewReplica,
    NewVolume,
    NodeInfo,
    ReplicaInfo,
    RestoreJob,
    SnapshotInfo,
    SnapshotMember,
    StaleVersion,
    VolumeInfo,
)
from engine.errors import AlreadyExists, InUse, NotFound, Precondition, Unavailable
from engine.qos.tiers import QosSpec

GIB = 1024**3


class FakeNode:
    def __init__(self, node_id: str, zone: str, *, free_bytes: int = 100 * GIB,
                 iops_capacity: int = 10_000, max_volumes: int = 64):
        self._node_id = node_id
        self.zone = zone
        self.free_bytes = free_bytes
        self.iops_capacity = iops_capacity
        self.max_volumes = max_volumes
        self.held: dict[str, VolumeInfo] = {}
        self.generations: dict[str, int] = {}  # replicas: the generation fenced at
        self.frontends: dict[str, tuple[str, ...]] = {}  # volume -> replicas its frontend has
        self.snapshots: dict[str, SnapshotInfo] = {}
        self.staged: set[str] = set()
        self.down = False  # unreachable: every call raises Unavailable
        self.fail_creates = False  # answers, but making storage fails (a crash, a full disk)
        self.refuse_creates = False  # answers that it can never make such a volume
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        # backup and restore jobs: started as the node API says, finished by the test
        self.backups: dict[str, tuple[BackupJob, JobStatus]] = {}
        self.restores: dict[str, tuple[RestoreJob, JobStatus]] = {}

    @property
    def node_id(self) -> str:
        return self._node_id

    def _reach(self, call: str, what: str = "") -> None:
        if self.down:
            raise Unavailable(f"node {self._node_id} is down")
        self.calls.append((call, what))

    def info(self) -> NodeInfo:
        self._reach("info")
        return NodeInfo(self._node_id, self.zone, 1000 * GIB, self.free_bytes, GIB,
                        self.iops_capacity, self.max_volumes,
                        replica_address=f"{self._node_id}:7400")

    def _check_version(self, volume_id: str, version: int) -> VolumeInfo:
        vol = self.held.get(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} is not on {self._node_id}")
        if version < vol.version:
            raise StaleVersion(f"{volume_id}: version {version} < {vol.version}")
        return vol

    def create_volume(self, spec: NewVolume) -> VolumeInfo:
        self._reach("create_volume", spec.volume_id)
        if self.fail_creates:
            raise Unavailable(f"node {self._node_id} failed while creating {spec.volume_id}")
        if self.refuse_creates:
            raise Precondition(f"node {self._node_id} cannot make {spec.volume_id}")
        with self._lock:
            vol = self.held.get(spec.volume_id)
            if vol is not None:
                if vol.size_bytes != spec.size_bytes:
                    raise AlreadyExists(f"{spec.volume_id} exists with another size")
                return vol
            if spec.source.kind == "volume" and spec.source.source_id not in self.held:
                raise NotFound(f"source {spec.source.source_id} is not here")
            if spec.source.kind == "snapshot" and spec.source.source_id not in self.snapshots:
                raise NotFound(f"source {spec.source.source_id} is not here")
            vol = VolumeInfo(spec.volume_id, spec.size_bytes, spec.access_types, spec.qos,
                             time.time(), False, Condition(), spec.version)
            self.held[spec.volume_id] = vol
            return vol

    def delete_volume(self, volume_id: str, version: int) -> None:
        self._reach("delete_volume", volume_id)
        with self._lock:
            if volume_id not in self.held:
                return
            self._check_version(volume_id, version)
            if volume_id in self.staged:
                raise InUse(f"{volume_id} is staged on {self._node_id}")
            self.restores.pop(volume_id, None)  # a restore into it stops first
            del self.held[volume_id]

    def expand_volume(self, volume_id: str, size_bytes: int, version: int) -> VolumeInfo:
        self._reach("expand_volume", volume_id)
        with self._lock:
            vol = self._check_version(volume_id, version)
            vol = dataclasses.replace(vol, size_bytes=max(vol.size_bytes, size_bytes),
                                      version=version)
            self.held[volume_id] = vol
            return vol

    def set_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        self._reach("set_qos", volume_id)
        with self._lock:
            vol = self._check_version(volume_id, version)
            self.held[volume_id] = dataclasses.replace(vol, qos=qos, version=version)

    def volume(self, volume_id: str) -> VolumeInfo | None:
        self._reach("volume", volume_id)
        vol = self.held.get(volume_id)
        if vol is not None and volume_id in self.staged:
            vol = dataclasses.replace(vol, staged=True)
        return vol

    def volumes(self, volume_ids: tuple[str, ...]) -> tuple[VolumeInfo, ...]:
        found = (self.volume(v) for v in volume_ids)
        return tuple(v for v in found if v is not None)

    def inventory(self) -> Inventory:
        self._reach("inventory")
        return Inventory(tuple(self.held.values()), tuple(self.snapshots.values()))

    # replicas: storage like a volume's, plus the generation the node last fenced at
    def create_replica(self, spec: NewReplica) -> ReplicaInfo:
        self._reach("create_replica", spec.volume_id)
        if self.fail_creates:
            raise Unavailable(f"node {self._node_id} failed while creating {spec.volume_id}")
        with self._lock:
            vol = self.held.get(spec.volume_id)
            if vol is None:
                vol = VolumeInfo(spec.volume_id, spec.size_bytes, ("block", "mount"),
                                 spec.qos, time.time(), False, Condition(), spec.version)
                self.held[spec.volume_id] = vol
            self.generations.setdefault(spec.volume_id, 0)
        return ReplicaInfo(spec.volume_id, self._node_id, f"{self._node_id}:7400",
                           vol.size_bytes, vol.version)

    def delete_replica(self, volume_id: str, version: int) -> None:
        self._reach("delete_replica", volume_id)
        self.delete_volume(volume_id, version)
        self.generations.pop(volume_id, None)

    def fence_replica(self, volume_id: str, generation: int) -> int:
        self._reach("fence_replica", volume_id)
        if volume_id not in self.generations:
            raise NotFound(f"no replica of {volume_id} on {self._node_id}")
        self.generations[volume_id] = max(self.generations[volume_id], generation)
        return self.generations[volume_id]

    def set_frontend_replicas(self, volume_id: str, replicas: tuple[str, ...]) -> bool:
        self._reach("set_frontend_replicas", volume_id)
        if volume_id not in self.frontends:
            return False
        self.frontends[volume_id] = tuple(replicas)
        return True

    def create_snapshots(self, members: tuple[SnapshotMember, ...]) -> tuple[SnapshotInfo, ...]:
        self._reach("create_snapshots", ",".join(m.snapshot_id for m in members))
        out = []
        with self._lock:
            for m in members:
                snap = self.snapshots.get(m.snapshot_id)
                if snap is None:
                    vol = self.held.get(m.volume_id)
                    if vol is None:
                        raise NotFound(f"volume {m.volume_id} is not on {self._node_id}")
                    snap = SnapshotInfo(m.snapshot_id, m.volume_id, vol.size_bytes, time.time())
                    self.snapshots[m.snapshot_id] = snap
                out.append(snap)
        return tuple(out)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._reach("delete_snapshot", snapshot_id)
        self.backups.pop(snapshot_id, None)  # its upload stops with it
        self.snapshots.pop(snapshot_id, None)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        self._reach("snapshot", snapshot_id)
        return self.snapshots.get(snapshot_id)

    def allocated_ranges(self, snapshot_id: str) -> tuple[ByteRange, ...]:
        self._reach("allocated_ranges", snapshot_id)
        return ()

    def changed_ranges(self, base_snapshot_id: str,
                       target_snapshot_id: str) -> tuple[ByteRange, ...]:
        self._reach("changed_ranges", target_snapshot_id)
        return ()

    # --- backups ---------------------------------------------------------------------
    def start_backup(self, job: BackupJob) -> JobStatus:
        self._reach("start_backup", job.snapshot_id)
        if job.snapshot_id not in self.snapshots:
            raise NotFound(f"snapshot {job.snapshot_id} has no storage on {self._node_id}")
        current = self.backups.get(job.snapshot_id)
        if current is not None and current[1].phase in (JOB_RUNNING, JOB_DONE):
            return current[1]
        self.backups[job.snapshot_id] = (job, JobStatus(JOB_RUNNING))
        return JobStatus(JOB_RUNNING)

    def backup_status(self, snapshot_id: str) -> JobStatus | None:
        self._reach("backup_status", snapshot_id)
        current = self.backups.get(snapshot_id)
        return current[1] if current else None

    def start_restore(self, job: RestoreJob) -> JobStatus:
        self._reach("start_restore", job.volume_id)
        if job.volume_id not in self.held:
            raise NotFound(f"volume {job.volume_id} is not on {self._node_id}")
        current = self.restores.get(job.volume_id)
        if current is not None and current[1].phase in (JOB_RUNNING, JOB_DONE):
            return current[1]
        self.restores[job.volume_id] = (job, JobStatus(JOB_RUNNING))
        return JobStatus(JOB_RUNNING)

    def restore_status(self, volume_id: str) -> JobStatus | None:
        self._reach("restore_status", volume_id)
        current = self.restores.get(volume_id)
        return current[1] if current else None

    def finish_job(self, jobs: dict, key: str, status: JobStatus) -> None:
        """The test's hand: a job ends (done, or failed with an error)."""
        jobs[key] = (jobs[key][0], status)
