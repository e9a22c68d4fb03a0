"""Where a volume's blocks live: the engine-internal Backend protocol.

NodeEngine and NodeVolumes know volumes through two things only: a record (`Backing`,
engine/volumes.py) and a block device that holds its bytes. A backend makes, finds,
attaches, releases and removes that storage; everything above it (stage, publish, mkfs,
mounts, QoS, records of stage and publish, crash safety) is the same whatever the backend.

Two implementations, one per pool, chosen by configuration (`--backend`):
- `loop` (engine/loop_backend.py): a sparse file per volume on a copy-on-write pool,
  behind a direct-I/O loop device attached while the volume is staged; the device is
  identified by its backing file's device and inode. Copy-on-write snapshots and clones.
- `nvme` (engine/nvme/backend.py): one NVMe namespace per volume, attached to the local
  controller for the volume's whole life; identified by subsystem NQN + NSID (and its
  NGUID/WWID), never by its `nvmeXnY` name. No snapshots or clones (Precondition).

Every method is idempotent; records come before storage on create and after it on delete
(see each implementation for what a crash in between leaves and how start-up settles it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from engine.pool import PoolUsage
from engine.qos.capacity import Capacity
from engine.volumes import Backing, PoolObject

if TYPE_CHECKING:
    from engine.freeze import Freezer
    from engine.mounts import MountEntry
    from engine.node_records import NodeRecords
    from engine.node_volumes import NodeVolumes
    from engine.snapshots import SnapshotBacking
    from engine.state import Store

LOOP, NVME = "loop", "nvme"
BACKENDS = (LOOP, NVME)


class Device(Protocol):
    """A block device holding a volume's bytes (a loop device, an NVMe namespace)."""

    @property
    def name(self) -> str: ...  # "loop7", "nvme0n3"

    @property
    def path(self) -> str: ...  # "/dev/loop7"

    @property
    def major(self) -> int: ...

    @property
    def minor(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def size_bytes(self) -> int: ...


class DeviceView(Protocol):
    """One reading of the kernel's devices, to ask about many volumes (ListVolumes)."""

    def devices_of(self, backing: Backing) -> list[Device]: ...


class SnapshotStore(Protocol):
    """What NodeEngine and the node API need of a backend's snapshots (engine/snapshots.py
    for loop; a refusal for backends without copy-on-write)."""

    orphans: list[str]

    def get(self, snapshot_id: str) -> SnapshotBacking | None: ...

    def require(self, snapshot_id: str) -> SnapshotBacking: ...

    def path(self, snap: SnapshotBacking) -> str: ...

    def all(self) -> list[SnapshotBacking]: ...

    def create(self, snapshot_id: str, volume_id: str) -> SnapshotBacking: ...

    def create_group(self, members: list[tuple[str, str]], *,
                     allow_block_in_use: bool = False,
                     quiesce: bool = True) -> list[SnapshotBacking]: ...

    def delete(self, snapshot_id: str) -> None: ...

    def quiesced(self, volume_ids: list[str], allow_block_in_use: bool): ...

    def reconcile(self) -> None: ...

    def purge_orphan(self, pool_name: str) -> None: ...


class Backend(Protocol):
    kind: str  # LOOP or NVME
    orphans: list[str]  # storage no record owns: reported, kept (see reconcile)

    # --- life of the backend ---------------------------------------------------------
    def open(self) -> None:
        """Bring the storage up (mount the pool, find the controller); StartupError-like
        domain errors (InvalidSpec, Precondition) say what a person must fix."""
        ...

    def reconcile(self) -> None:
        """Settle records against storage after a restart; report orphans, delete nothing."""
        ...

    # --- records (kind "backing") ------------------------------------------------------
    def get(self, volume_id: str) -> Backing | None: ...

    def require(self, volume_id: str) -> Backing: ...

    def all(self) -> list[Backing]: ...

    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None: ...

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing: ...

    def purge_orphan(self, pool_name: str) -> None: ...

    # --- storage -----------------------------------------------------------------------
    def create(self, volume_id: str, size_bytes: int, *, clone_from: Backing | None = None,
               restore_from: PoolObject | None = None, qos_json: str = "", version: int = 0,
               access_types: tuple[str, ...] = (),
               role: str = "volume") -> Backing: ...

    def delete(self, volume_id: str) -> None:
        """Remove the storage (the caller has checked nothing uses it)."""
        ...

    def expand(self, volume_id: str, size_bytes: int, version: int = 0) -> Backing: ...

    def check_version(self, backing: Backing, version: int) -> None: ...

    def usage(self) -> PoolUsage: ...

    def max_volumes(self) -> int | None:
        """The backend's own limit of volumes on this node (None: no limit of its own)."""
        ...

    def measure_capacity(self, seconds: int) -> Capacity:
        """IOPS capacity for guaranteed minima, measured where no volume lives (a scratch
        file of the pool, a namespace reserved for it); CommandFailed or Precondition
        when it cannot be measured here."""
        ...

    def make_snapshots(self, store: Store, volumes: NodeVolumes,
                       freezer: Freezer) -> SnapshotStore: ...

    def check_copy_on_write(self, what: str) -> None:
        """Precondition when the backend cannot make `what` (a clone, a restore)."""
        ...

    def replica_file(self, backing: Backing) -> str:
        """The file holding a replica's bytes (the replica service serves files)."""
        ...

    def replica_directory(self) -> str:
        """Where this node's mirror replica service keeps replicas (sparse files with
        their dirty maps); Precondition where the backend cannot hold them."""
        ...

    # --- devices -----------------------------------------------------------------------
    def devices(self, backing: Backing) -> list[Device]:
        """Every device now holding the volume's bytes (read-write and read-only)."""
        ...

    def attach(self, backing: Backing, *, read_only: bool = False) -> Device:
        """A device for the volume: the read-write one, or (read_only) one the kernel
        itself refuses writes through."""
        ...

    def release(self, backing: Backing, dev: Device, *, require_released: bool = False) -> None:
        """The device is no longer needed by a stage or publish (loop: detach it). With
        require_released, a device still held open is InUse and stays as it was."""
        ...

    def refreshed(self, backing: Backing, dev: Device) -> Device:
        """The device, made to show the volume's recorded size (after an expansion)."""
        ...

    def still_holds(self, backing: Backing, dev: Device) -> bool:
        """Whether dev (a device recorded earlier) still holds this volume."""
        ...

    def device_at(self, path: str) -> Device | None: ...

    def holds_data(self, backing: Backing, dev: Device) -> bool:
        """Whether anything was ever written to the volume (the never-format-data rule)."""
        ...

    def filesystem_bytes(self, backing: Backing) -> int:
        """How much of the device a filesystem made on it may cover (0: all of it)."""
        ...

    def storage_missing(self, backing: Backing) -> str:
        """Why the volume's storage is gone ('' when it is there)."""
        ...

    def device_view(self) -> DeviceView: ...

    def release_unowned(self, records: NodeRecords, table: Iterable[MountEntry]) -> None:
        """Release devices on this backend's storage that no record uses and nothing
        mounts (start-up)."""
        ...
