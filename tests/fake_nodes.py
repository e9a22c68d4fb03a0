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
    SOURCE_REPLICA,
    SOURCE_SNAPSHOT,
    SOURCE_VOLUME,
    BackupJob,
    ByteRange,
    Condition,
    FrontendBarrier,
    HeldReplica,
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
    VolumeSource,
)
from engine.errors import AlreadyExists, InUse, InvalidSpec, NotFound, Precondition, Unavailable
from engine.qos.tiers import QosSpec

GIB = 1024**3


class FakeNode:
    def __init__(self, node_id: str, zone: str, *, free_bytes: int = 100 * GIB,
                 iops_capacity: int = 10_000, max_volumes: int = 64,
                 serves_replicas: bool = True):
        self._node_id = node_id
        self.zone = zone
        self.free_bytes = free_bytes
        self.iops_capacity = iops_capacity
        self.serves_replicas = serves_replicas  # False: no replica service (NVMe nodes)
        self.max_volumes = max_volumes
        self.held: dict[str, VolumeInfo] = {}
        self.generations: dict[str, int] = {}  # replicas: the generation fenced at
        self.frontends: dict[str, tuple[str, ...]] = {}  # volume -> replicas its frontend has
        self.identical: dict[str, tuple[str, ...]] = {}  # a barrier's answer (default: all)
        self.barriers: dict[tuple[str, str], str] = {}  # (volume, token) -> "held"
        self.barrier_lets_go = False  # resume answers that the barrier did not hold
        self.stage_holds: dict[str, str] = {}  # volume -> token (no frontend runs here)
        self.frontend_qos: dict[str, tuple[QosSpec, int]] = {}
        self.activity_logs: dict[str, int] = {}  # replica -> extents its files name
        self.made_from: dict[str, VolumeSource] = {}  # what each volume or replica copied
        self.rebuilding: set[str] = set()  # replicas made empty, marked for a full rebuild
        self.fail_snapshots = False
        self.on_snapshot = None  # test hook: called (node, snapshot_id) after each copy
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
                        replica_address=f"{self._node_id}:7400" if self.serves_replicas
                        else "")

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
            self._check_source(spec.source, replica=False)
            self.made_from[spec.volume_id] = spec.source
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
                self._check_source(spec.source, replica=True)
                vol = VolumeInfo(spec.volume_id, spec.size_bytes, ("block", "mount"),
                                 spec.qos, time.time(), False, Condition(), spec.version)
                self.held[spec.volume_id] = vol
                self.made_from[spec.volume_id] = spec.source
                if spec.rebuild:
                    self.rebuilding.add(spec.volume_id)
            self.generations.setdefault(spec.volume_id, 0)
        return ReplicaInfo(spec.volume_id, self._node_id, f"{self._node_id}:7400",
                           vol.size_bytes, vol.version)

    def _check_source(self, source: VolumeSource, replica: bool) -> None:
        if source.kind == SOURCE_SNAPSHOT and source.source_id not in self.snapshots:
            raise NotFound(f"snapshot {source.source_id} is not on {self._node_id}")
        if source.kind in (SOURCE_VOLUME, SOURCE_REPLICA):
            if source.source_id not in self.held:
                raise NotFound(f"{source.source_id} is not on {self._node_id}")
            if (source.source_id in self.generations) != (source.kind == SOURCE_REPLICA):
                raise InvalidSpec(f"{source.source_id} on {self._node_id} is not a "
                                  f"{source.kind}")

    def replica(self, volume_id: str) -> HeldReplica | None:
        self._reach("replica", volume_id)
        vol = self.held.get(volume_id)
        if vol is None or volume_id not in self.generations:
            return None
        return HeldReplica(volume_id, vol.size_bytes, self.generations[volume_id], 0,
                           self.activity_logs.get(volume_id, 0))

    def expand_replica(self, volume_id: str, size_bytes: int, version: int) -> HeldReplica:
        self._reach("expand_replica", volume_id)
        if volume_id not in self.generations:
            raise NotFound(f"no replica of {volume_id} on {self._node_id}")
        self.expand_volume(volume_id, size_bytes, version)
        held = self.replica(volume_id)
        assert held is not None
        return held

    def snapshot_replica(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        self._reach("snapshot_replica", f"{snapshot_id}:{volume_id}")
        if volume_id not in self.generations:
            raise NotFound(f"no replica of {volume_id} on {self._node_id}")
        if self.fail_snapshots:
            raise Unavailable(f"node {self._node_id} failed while snapshotting")
        with self._lock:
            snap = self.snapshots.get(snapshot_id)
            if snap is None:
                snap = SnapshotInfo(snapshot_id, volume_id, self.held[volume_id].size_bytes,
                                    time.time())
                self.snapshots[snapshot_id] = snap
        if self.on_snapshot is not None:
            self.on_snapshot(self, snapshot_id)
        return snap

    # the frontend of a mirrored volume attached here (frontends: the ones running)
    def barrier_frontend(self, volume_id: str, token: str, hold_s: float) -> FrontendBarrier:
        self._reach("barrier_frontend", f"{volume_id}:{token}")
        if volume_id not in self.frontends:
            self.stage_holds[volume_id] = token
            return FrontendBarrier(volume_id, token, False)
        self.barriers[(volume_id, token)] = "held"
        identical = self.identical.get(volume_id)
        if identical is None:
            identical = tuple(r.split("@")[0] for r in self.frontends[volume_id])
        return FrontendBarrier(volume_id, token, True, identical, 1)

    def resume_frontend(self, volume_id: str, token: str) -> bool:
        self._reach("resume_frontend", f"{volume_id}:{token}")
        if self.stage_holds.get(volume_id) == token:
            del self.stage_holds[volume_id]
            return not self.barrier_lets_go
        state = self.barriers.pop((volume_id, token), None)
        return state == "held" and not self.barrier_lets_go

    def set_frontend_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        self._reach("set_frontend_qos", volume_id)
        current = self.frontend_qos.get(volume_id)
        if current is None or current[1] <= version:
            self.frontend_qos[volume_id] = (qos, version)

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
