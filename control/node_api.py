"""The node API: everything the controller and the snapshot services may ask of a node.

A Protocol with plain frozen dataclasses as arguments and results. The controller knows
nothing else of a node: in all-in-one the engine sits behind it in the same process
(control/local_node.py); in a cluster a gRPC client reaches the node's agent. This module
imports neither grpc nor the engine's internals (QosSpec is a plain value).

Versions: every mutating call carries the version of the cluster record it acts on (the
store's version after the controller's own compare-and-set write). A node keeps the
highest version it has acted on per volume and refuses an older one (StaleVersion), so a
delayed call from a controller that lost a race can never undo a newer decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.backup.targets import ObjectStore
from engine.errors import StaleVersion
from engine.qos.tiers import QosSpec

MOUNT, BLOCK = "mount", "block"
SOURCE_VOLUME, SOURCE_SNAPSHOT = "volume", "snapshot"
# a copy-on-write copy of this node's replica of a mirrored volume, taken as it is: the
# controller holds the volume's write barrier meanwhile (a node-side freeze would deadlock)
SOURCE_REPLICA = "replica"
SOURCE_BACKUP = "backup"  # a backup in object storage: the node makes an empty volume
JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_STOPPED = "running", "done", "failed", "stopped"
__all__ = ["StaleVersion"]  # raised by nodes; defined with the other domain errors


@dataclass(frozen=True)
class Condition:
    """A volume's health as the node sees it in the kernel and the pool."""

    abnormal: bool = False
    message: str = ""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    zone: str
    total_bytes: int  # the pool
    free_bytes: int
    reserve_bytes: int  # room volumes may not take (metadata, copy-on-write)
    iops_capacity: int  # what guaranteed minima are admitted against
    max_volumes: int
    condition: Condition = Condition()
    replica_address: str = ""  # host:port of its replica service ("": serves none)


@dataclass(frozen=True)
class VolumeSource:
    kind: str = ""  # "", SOURCE_VOLUME or SOURCE_SNAPSHOT
    source_id: str = ""


@dataclass(frozen=True)
class NewVolume:
    volume_id: str
    size_bytes: int
    access_types: tuple[str, ...]  # what it was created for: MOUNT and/or BLOCK
    qos: QosSpec = QosSpec()
    source: VolumeSource = VolumeSource()
    version: int = 0


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    size_bytes: int
    access_types: tuple[str, ...]
    qos: QosSpec
    created_at: float
    staged: bool  # held on this node by a stage (its device in use)
    condition: Condition = Condition()
    version: int = 0  # the newest record version the node has acted on


@dataclass(frozen=True)
class SnapshotMember:
    snapshot_id: str
    volume_id: str


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    source_volume_id: str
    size_bytes: int
    created_at: float


@dataclass(frozen=True)
class ByteRange:
    offset_bytes: int
    length_bytes: int

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.length_bytes


@dataclass(frozen=True)
class NewReplica:
    """One replica of a mirrored volume: a volume of the node's pool, served to the
    volume's frontend by the node's replica service."""

    volume_id: str
    size_bytes: int
    qos: QosSpec = QosSpec()
    version: int = 0
    # a replacement for a lost replica: it starts with every region marked to copy, so
    # whichever frontend next serves the volume rebuilds it whole from an in-sync replica
    rebuild: bool = False
    # its first bytes (a restore or a clone): a snapshot on this node, a local volume, or
    # this node's replica of another mirrored volume (SOURCE_REPLICA); none: empty
    source: VolumeSource = VolumeSource()


@dataclass(frozen=True)
class ReplicaInfo:
    volume_id: str
    node_id: str
    address: str  # host:port of the node's replica service
    size_bytes: int
    version: int = 0


@dataclass(frozen=True)
class HeldReplica:
    """One replica as its node holds it (its files; the service may have newer maps in
    memory: a count here is an upper bound while a frontend has it open)."""

    volume_id: str
    size_bytes: int
    generation: int
    dirty_regions: int  # regions some other replica may lack (tracked while one is away)
    activity_log_extents: int  # 0: no write of any frontend may be half done on it


@dataclass(frozen=True)
class FrontendBarrier:
    """A mirrored volume's write barrier on the node where it is attached. running: its
    frontend serves here and holds writes (then `replicas` are those identical at the
    barrier, `generation` its own); else nothing serves it here, and staging it is
    refused until the barrier goes (a frontend cannot start in the middle)."""

    volume_id: str
    token: str
    running: bool
    replicas: tuple[str, ...] = ()
    generation: int = 0


@dataclass(frozen=True)
class BackupJob:
    """Upload a local snapshot (taken by create_snapshots) to a target."""

    snapshot_id: str
    backup_id: str
    store: ObjectStore = field(repr=False)  # target and credentials (never logged)
    base_snapshot_id: str = ""  # a local snapshot already backed up as base_backup_id
    base_backup_id: str = ""


@dataclass(frozen=True)
class RestoreJob:
    """Fill a volume made empty for it (create_volume, source SOURCE_BACKUP)."""

    volume_id: str
    backup_id: str
    store: ObjectStore = field(repr=False)


@dataclass(frozen=True)
class JobStatus:
    phase: str  # JOB_RUNNING, JOB_DONE, JOB_FAILED, or JOB_STOPPED (a restart cut it)
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_uploaded: int = 0
    error: str = ""
    error_kind: str = ""  # the domain error's class name (engine/errors.py)


@dataclass(frozen=True)
class Inventory:
    """What a node holds, for reconciliation against the cluster's records."""

    volumes: tuple[VolumeInfo, ...] = ()
    snapshots: tuple[SnapshotInfo, ...] = ()
    orphans: tuple[str, ...] = field(default=())  # pool objects no node record owns


class NodeApi(Protocol):
    """One node, as the controller sees it. Every call is idempotent."""

    @property
    def node_id(self) -> str: ...

    def info(self) -> NodeInfo: ...

    # --- volumes -------------------------------------------------------------------
    def create_volume(self, spec: NewVolume) -> VolumeInfo:
        """Make the volume (empty, a clone of a local volume, or a restore of a local
        snapshot); the same spec again returns the existing volume."""
        ...

    def delete_volume(self, volume_id: str, version: int) -> None:
        """Remove its storage. Called only once the cluster record is a tombstone at
        `version`; gone already is success; staged is InUse."""
        ...

    def expand_volume(self, volume_id: str, size_bytes: int, version: int) -> VolumeInfo: ...

    def set_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        """Record the volume's tier and apply it to the pods using it now."""
        ...

    def volume(self, volume_id: str) -> VolumeInfo | None:
        """What the node holds of the volume, from its records (cheap: no condition)."""
        ...

    def volumes(self, volume_ids: tuple[str, ...]) -> tuple[VolumeInfo, ...]:
        """The volumes of these IDs the node holds, each with its condition from the
        kernel's state (one reading of the kernel for all)."""
        ...

    def inventory(self) -> Inventory: ...

    # --- replicas of mirrored volumes ----------------------------------------------------
    def create_replica(self, spec: NewReplica) -> ReplicaInfo:
        """Make the replica (idempotent); Precondition where the node serves no replicas."""
        ...

    def delete_replica(self, volume_id: str, version: int) -> None:
        """Remove it (a tombstone at `version`); InUse while a frontend has it open."""
        ...

    def fence_replica(self, volume_id: str, generation: int) -> int:
        """Raise the replica's generation: every older frontend is cut off it for good.
        Returns the replica's generation after (>= generation)."""
        ...

    def set_frontend_replicas(self, volume_id: str, replicas: tuple[str, ...]) -> bool:
        """The volume's frontend on this node (if one runs) serves exactly these replicas
        ("node@host:port"): new ones are added (and rebuilt), others removed. False when no
        frontend of the volume runs here."""
        ...

    def replica(self, volume_id: str) -> HeldReplica | None:
        """The replica of the volume on this node, from its files (None: it holds none)."""
        ...

    def expand_replica(self, volume_id: str, size_bytes: int, version: int) -> HeldReplica:
        """Grow the replica (its pool volume and its maps), open by a frontend or not;
        idempotent, never shrinks."""
        ...

    def snapshot_replica(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        """A copy-on-write snapshot of this node's replica of the volume, taken as it is
        (no freeze: the controller holds the volume's write barrier); idempotent."""
        ...

    # --- the frontends of mirrored volumes attached here ---------------------------------
    def barrier_frontend(self, volume_id: str, token: str, hold_s: float) -> FrontendBarrier:
        """Hold the volume's writes here (its filesystem frozen if mounted, then the
        frontend's write barrier) until resume_frontend(token) or hold_s from now; when no
        frontend of the volume runs here, its staging is refused as long. Idempotent."""
        ...

    def resume_frontend(self, volume_id: str, token: str) -> bool:
        """Let the barrier go: True when it held from barrier_frontend until now (False:
        it let go at its deadline, failed, or is unknown here, say after a restart)."""
        ...

    def set_frontend_qos(self, volume_id: str, qos: QosSpec, version: int) -> None:
        """The tier of the volume's frontend here, applied to the pods using it now, and
        kept for its next stage (even when it is attached but not staged yet)."""
        ...

    # --- snapshots -----------------------------------------------------------------
    def create_snapshots(self, members: tuple[SnapshotMember, ...]) -> tuple[SnapshotInfo, ...]:
        """Snapshots of local volumes taken at one instant (mounted ones frozen together)."""
        ...

    def delete_snapshot(self, snapshot_id: str) -> None: ...

    def snapshot(self, snapshot_id: str) -> SnapshotInfo | None: ...

    def allocated_ranges(self, snapshot_id: str) -> tuple[ByteRange, ...]:
        """Where the snapshot holds data (extent maps; no data is read)."""
        ...

    def changed_ranges(self, base_snapshot_id: str,
                       target_snapshot_id: str) -> tuple[ByteRange, ...]:
        """Where two snapshots of one volume differ."""
        ...

    # --- backups (the data is read and written here, on the node) --------------------
    def start_backup(self, job: BackupJob) -> JobStatus:
        """Start (or resume from its checkpoints) the upload; a running or finished job is
        left as it is. Deleting the snapshot stops it."""
        ...

    def backup_status(self, snapshot_id: str) -> JobStatus | None: ...

    def start_restore(self, job: RestoreJob) -> JobStatus:
        """Start (or restart) filling the volume from the backup; every blob is checked.
        Deleting the volume stops it."""
        ...

    def restore_status(self, volume_id: str) -> JobStatus | None: ...
