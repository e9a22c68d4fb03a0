"""The node API implemented by this node's engine, in the same process.

All-in-one: the controller's registry holds one LocalNode. Cluster: the node agent serves
a LocalNode to the controllers over gRPC. Every call that changes a volume takes the
node's one per-volume lock table (shared with the CSI Node service), so a controller's
call and a kubelet's call on one volume never interleave (the second is ABORTED).
"""

from __future__ import annotations

from control.frontend_backend import FrontendBackend
from control.node_api import (
    BLOCK,
    MOUNT,
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
    VolumeInfo,
)
from control.node_barrier import FrontendBarriers
from control.node_mirror import ReplicaHost
from engine import changed_blocks
from engine.backup.jobs import BackupSpec, Jobs, JobState, RestoreSpec
from engine.backup.targets import Targets
from engine.errors import AlreadyExists, InvalidSpec, NotFound, Precondition
from engine.node_engine import NodeEngine
from engine.node_volumes import KernelView
from engine.qos.tiers import QosSpec
from engine.snapshots import SnapshotBacking
from engine.volumes import Backing, VolumeFiles

REPLICA = "replica"


class LocalNode:
    def __init__(self, engine: NodeEngine, max_volumes: int,
                 replicas: ReplicaHost | None = None,
                 frontends: FrontendBackend | None = None, *,
                 targets: Targets | None = None, backup_lock_stale_s: float = 600.0):
        self.engine = engine
        self.max_volumes = max_volumes
        self.replicas = replicas  # None: this node serves no replicas (all-in-one)
        self.frontends = frontends  # the mirrored volumes staged here (cluster nodes)
        self._frontend_barriers: FrontendBarriers | None = None
        # backup and restore jobs read and write this node's pool files, in the background,
        # to and from the targets of this node's own --backup-targets file (none: no jobs)
        self.targets = targets or Targets()
        self.jobs = Jobs(engine.store, self._snapshot_path, self._volume_path,
                         lock_stale_s=backup_lock_stale_s)

    def close(self) -> None:
        """Stop the background jobs (their records let the next start resume them)."""
        self.jobs.close()

    @property
    def node_id(self) -> str:
        return self.engine.identity.node_id

    def info(self) -> NodeInfo:
        usage = self.engine.usage()
        orphans = len(self.engine.files.orphans) + len(self.engine.snapshots.orphans)
        condition = Condition(True, f"{orphans} pool objects have no record (see "
                                    "`tandem-admin orphans`)") if orphans else Condition()
        return NodeInfo(self.node_id, self.engine.identity.zone, usage.total_bytes,
                        usage.free_bytes, usage.reserve_bytes, self.engine.iops_capacity,
                        self.max_volumes, condition,
                        self.replicas.listen if self.replicas is not None else "")

    # --- volumes -------------------------------------------------------------------
    def _info(self, backing: Backing, view: KernelView | None = None, *,
              condition_too: bool = True, staged: bool | None = None) -> VolumeInfo:
        condition = self.engine.volume_condition(backing.volume_id, view) if condition_too \
            else Condition()
        if staged is None:
            staged = self.engine.is_staged(backing.volume_id)
        return VolumeInfo(
            volume_id=backing.volume_id, size_bytes=backing.size_bytes,
            # records from before access types were kept: unknown, either may be asked
            access_types=backing.access_types or (BLOCK, MOUNT),
            qos=QosSpec.from_json(backing.qos_json), created_at=backing.created_at,
            staged=staged,
            condition=Condition(condition.abnormal, condition.message),
            version=backing.version)

    def create_volume(self, spec: NewVolume) -> VolumeInfo:
        # the source too: a snapshot or volume cannot go while it is being copied
        with self.engine.locks.hold(spec.volume_id, spec.source.source_id):
            if spec.source.kind == SOURCE_REPLICA:  # a local copy of a mirrored volume
                self._check_source_role(spec.source.source_id, SOURCE_REPLICA)
                backing = self.engine.create_volume(
                    spec.volume_id, spec.size_bytes, spec.qos, spec.source.source_id,
                    spec.version, spec.access_types, quiesce=False)
                return self._info(backing, condition_too=False, staged=False)
            if spec.source.kind == SOURCE_SNAPSHOT:
                backing = self.engine.restore_volume(
                    spec.volume_id, spec.size_bytes, spec.qos, spec.source.source_id,
                    spec.version, spec.access_types)
            else:
                clone_from = spec.source.source_id if spec.source.kind == SOURCE_VOLUME else ""
                backing = self.engine.create_volume(spec.volume_id, spec.size_bytes, spec.qos,
                                                    clone_from, spec.version, spec.access_types)
            # a new volume is not staged; a repeat's staging does not matter to the caller
            return self._info(backing, condition_too=False, staged=False)

    def delete_volume(self, volume_id: str, version: int) -> None:
        with self.engine.locks.hold(volume_id):
            backing = self.engine.volume(volume_id)
            if backing is not None:
                self.engine.files.check_version(backing, version)
            self.jobs.forget_restore(volume_id)  # a restore writing into it stops first
            self.engine.delete_volume(volume_id, version)

    def expand_volume(self, volume_id: str, size_bytes: int, version: int) -> VolumeInfo:
        with self.engine.locks.hold(volume_id):
            return self._info(self.engine.expand_volume(volume_id, size_bytes, version),
                              condition_too=False)

    def set_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        with self.engine.locks.hold(volume_id):
            self.engine.set_qos(volume_id, qos, version)

    def volume(self, volume_id: str) -> VolumeInfo | None:
        backing = self.engine.volume(volume_id)
        return self._info(backing, condition_too=False) if backing is not None else None

    def volumes(self, volume_ids: tuple[str, ...]) -> tuple[VolumeInfo, ...]:
        view = self.engine.kernel_view()
        found = (self.engine.volume(v) for v in volume_ids)
        return tuple(self._info(b, view) for b in found if b is not None)

    def inventory(self) -> Inventory:
        view = self.engine.kernel_view()
        return Inventory(
            volumes=tuple(self._info(b, view) for b in self.engine.files.all()),
            snapshots=tuple(_snapshot_info(s) for s in self.engine.snapshots.all()),
            orphans=tuple(self.engine.files.orphans + self.engine.snapshots.orphans))

    # --- replicas ------------------------------------------------------------------
    def _replica_host(self) -> ReplicaHost:
        if self.replicas is None:
            raise Precondition(f"node {self.node_id} serves no replicas: mirrored volumes "
                               "(replicas > 1) need the cluster mode's node processes")
        return self.replicas

    def create_replica(self, spec: NewReplica) -> ReplicaInfo:
        host = self._replica_host()
        source = spec.source
        with self.engine.locks.hold(spec.volume_id, source.source_id):
            backing = self._replica_backing(spec)
            if backing.role != REPLICA:
                raise AlreadyExists(f"{spec.volume_id} is a volume of its own on "
                                    f"{self.node_id}, not a replica")
            host.create(spec.volume_id, spec.size_bytes, self.engine.files.replica_file(backing),
                        rebuild=spec.rebuild)
            return ReplicaInfo(spec.volume_id, self.node_id, host.listen, backing.size_bytes,
                               backing.version)

    def _replica_backing(self, spec: NewReplica) -> Backing:
        """The replica's pool volume: empty, or a copy-on-write copy of its source here."""
        kind, source_id = spec.source.kind, spec.source.source_id
        if kind == SOURCE_SNAPSHOT:
            return self.engine.restore_volume(spec.volume_id, spec.size_bytes, spec.qos,
                                              source_id, spec.version, role=REPLICA)
        if kind in (SOURCE_VOLUME, SOURCE_REPLICA):
            self._check_source_role(source_id, kind)
            # a replica's bytes are copied as they are: the controller holds its volume's
            # write barrier (a freeze here would wait on that very barrier)
            return self.engine.create_volume(spec.volume_id, spec.size_bytes, spec.qos,
                                             source_id, spec.version, role=REPLICA,
                                             quiesce=kind == SOURCE_VOLUME)
        return self.engine.create_volume(spec.volume_id, spec.size_bytes, spec.qos,
                                         version=spec.version, role=REPLICA)

    def _check_source_role(self, source_id: str, kind: str) -> None:
        backing = self.engine.volume(source_id)
        if backing is None:
            raise NotFound(f"{source_id} has no storage on {self.node_id}")
        if (backing.role == REPLICA) != (kind == SOURCE_REPLICA):
            raise InvalidSpec(f"{source_id} is {'a' if backing.role == REPLICA else 'not a'} "
                              f"replica on {self.node_id}; the source says {kind}")

    def replica(self, volume_id: str) -> HeldReplica | None:
        held = self._replica_host().held(volume_id)
        return _held_replica(held) if held is not None else None

    def expand_replica(self, volume_id: str, size_bytes: int, version: int) -> HeldReplica:
        host = self._replica_host()
        with self.engine.locks.hold(volume_id):
            backing = self.engine.volume(volume_id)
            if backing is None or backing.role != REPLICA or not host.exists(volume_id):
                raise NotFound(f"no replica of {volume_id} on {self.node_id}")
            self.engine.expand_volume(volume_id, size_bytes, version)  # its bytes first
            return _held_replica(host.grow(volume_id, size_bytes))

    def snapshot_replica(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        self._replica_host()
        with self.engine.locks.hold(volume_id):
            backing = self.engine.volume(volume_id)
            if backing is None or backing.role != REPLICA:
                raise NotFound(f"no replica of {volume_id} on {self.node_id}")
            return _snapshot_info(self.engine.snapshot_as_is(snapshot_id, volume_id))

    # --- the frontends of mirrored volumes attached here -----------------------------------
    def _barriers(self) -> FrontendBarriers:
        if self.frontends is None:
            raise Precondition(f"node {self.node_id} runs no mirror frontends")
        if self._frontend_barriers is None:
            self._frontend_barriers = FrontendBarriers(self.engine, self.frontends)
        return self._frontend_barriers

    def barrier_frontend(self, volume_id: str, token: str, hold_s: float) -> FrontendBarrier:
        barriers = self._barriers()
        with self.engine.locks.hold(volume_id):
            return barriers.barrier(volume_id, token, hold_s)

    def resume_frontend(self, volume_id: str, token: str) -> bool:
        # without the volume's lock: a kubelet call on the volume meanwhile (a publish) must
        # not keep the writes held until the barrier's deadline
        return self._barriers().resume(volume_id, token)

    def set_frontend_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        if self.frontends is None:
            raise Precondition(f"node {self.node_id} runs no mirror frontends")
        with self.engine.locks.hold(volume_id):
            self.frontends.set_qos(volume_id, qos.to_json(), version)
            if self.frontends.record(volume_id) is not None:  # staged: its pods now
                self.engine.qos.enforce(volume_id, qos)

    def delete_replica(self, volume_id: str, version: int) -> None:
        host = self._replica_host()
        with self.engine.locks.hold(volume_id):
            backing = self.engine.volume(volume_id)
            if backing is not None:
                self.engine.files.check_version(backing, version)
            host.delete(volume_id)  # InUse while a frontend has it open
            self.engine.delete_volume(volume_id, version)

    def fence_replica(self, volume_id: str, generation: int) -> int:
        host = self._replica_host()
        if not host.exists(volume_id):
            raise NotFound(f"no replica of {volume_id} on {self.node_id}")
        return host.fence(volume_id, generation)

    def set_frontend_replicas(self, volume_id: str, replicas: tuple[str, ...]) -> bool:
        if self.frontends is None:
            return False
        with self.engine.locks.hold(volume_id):
            return self.frontends.set_replicas(volume_id, replicas)

    # --- snapshots -----------------------------------------------------------------
    def create_snapshots(self, members: tuple[SnapshotMember, ...]) -> tuple[SnapshotInfo, ...]:
        volume_ids = sorted({m.volume_id for m in members})
        with self.engine.locks.hold(*volume_ids):
            made = self.engine.create_snapshots([(m.snapshot_id, m.volume_id) for m in members])
        return tuple(_snapshot_info(s) for s in made)

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self.engine.locks.hold(snapshot_id):
            self.jobs.forget_backup(snapshot_id)  # an upload reading it stops first
            self.engine.delete_snapshot(snapshot_id)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        snap = self.engine.snapshot(snapshot_id)
        return _snapshot_info(snap) if snap is not None else None

    def _snapshot_path(self, snapshot_id: str) -> str:
        return self.engine.snapshots.path(self.engine.snapshots.require(snapshot_id))

    def _volume_path(self, volume_id: str) -> str:
        """The file holding the volume's bytes (restores write it): the loop backend only."""
        files = self.engine.files
        if not isinstance(files, VolumeFiles):
            raise Precondition("restoring a backup needs the loop backend: this node's "
                               "volumes are not files in a pool")
        return files.path(files.require(volume_id))

    def allocated_ranges(self, snapshot_id: str) -> tuple[ByteRange, ...]:
        return _ranges(changed_blocks.allocated(self._snapshot_path(snapshot_id)))

    def changed_ranges(self, base_snapshot_id: str,
                       target_snapshot_id: str) -> tuple[ByteRange, ...]:
        return _ranges(changed_blocks.delta(self._snapshot_path(base_snapshot_id),
                                            self._snapshot_path(target_snapshot_id)))

    # --- backups -------------------------------------------------------------------
    def start_backup(self, job: BackupJob) -> JobStatus:
        store = self.targets.as_here(job.store, f"node {self.node_id}")
        with self.engine.locks.hold(job.snapshot_id):
            snap = self.engine.snapshots.require(job.snapshot_id)
            return _status(self.jobs.start_backup(BackupSpec(
                job.snapshot_id, job.backup_id, snap.source_volume_id, snap.created_at,
                job.base_snapshot_id, job.base_backup_id), store))

    def backup_status(self, snapshot_id: str) -> JobStatus | None:
        state = self.jobs.backup_state(snapshot_id)
        return _status(state) if state is not None else None

    def start_restore(self, job: RestoreJob) -> JobStatus:
        store = self.targets.as_here(job.store, f"node {self.node_id}")
        with self.engine.locks.hold(job.volume_id):
            return _status(self.jobs.start_restore(RestoreSpec(job.volume_id, job.backup_id),
                                                   store))

    def restore_status(self, volume_id: str) -> JobStatus | None:
        state = self.jobs.restore_state(volume_id)
        return _status(state) if state is not None else None


def _status(state: JobState) -> JobStatus:
    return JobStatus(state.phase, state.bytes_total, state.bytes_done, state.bytes_uploaded,
                     state.error, state.error_kind)


def _held_replica(info: dict) -> HeldReplica:
    return HeldReplica(info["volume_id"], int(info["size_bytes"]), int(info["generation"]),
                       int(info["dirty_regions"]), int(info["al_extents"]))


def _snapshot_info(snap: SnapshotBacking) -> SnapshotInfo:
    return SnapshotInfo(snap.snapshot_id, snap.source_volume_id, snap.size_bytes,
                        snap.created_at)


def _ranges(ranges: list[changed_blocks.Range]) -> tuple[ByteRange, ...]:
    return tuple(ByteRange(r.offset_bytes, r.length_bytes) for r in ranges)
