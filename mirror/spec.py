"""Frozen values shared by the replica service, the frontend and the control plane."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

REGION_BYTES = 64 * 1024  # dirty-bitmap granularity: 16 GiB -> 256 KiB map
AL_EXTENT_BYTES = 4 * 1024 * 1024  # activity-log granularity (DRBD uses 4 MiB too)


@dataclass(frozen=True)
class ReplicaAddr:
    """Where one replica of a volume lives: a replica service and a stable id."""

    replica_id: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ReplicaAddr:
        """`id@host:port`, the form used on command lines."""
        rid, _, hostport = text.partition("@")
        host, _, port = hostport.rpartition(":")
        return cls(rid, host, int(port))

    def __str__(self) -> str:
        return f"{self.replica_id}@{self.host}:{self.port}"


# StrEnum would change str() and f-strings of the members (behaviour change): kept as is
class ReplicaState(str, enum.Enum):  # noqa: UP042
    IN_SYNC = "in_sync"
    OUT_OF_SYNC = "out_of_sync"  # durable: never read, never a resync source
    RESYNCING = "resyncing"  # receives new writes and dirty regions; still not a source


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    state: ReplicaState
    connected: bool
    resync_done_bytes: int = 0
    resync_total_bytes: int = 0


@dataclass(frozen=True)
class FrontendTuning:
    """Knobs with defaults measured on the 2-core test VM (see docs/mirror.md)."""

    io_timeout_s: float = 5.0  # a replica slower than this on its oldest request is dropped
    reconnect_interval_s: float = 1.0
    max_background: int = 128  # FUSE: >= the queue depth or the kernel throttles
    max_write_bytes: int = 1024 * 1024
    al_max_extents: int = 1024  # hot activity-log extents (4 GiB at 4 MiB)
    resync_chunk_bytes: int = 1024 * 1024
    resync_inflight_chunks: int = 8
    min_in_sync: int = 1  # fewer reachable in-sync replicas -> I/O fails (EIO)
    # > 0: an INFO to every connected replica this often, whose answer proves the replica
    # still serves this frontend's generation (MirrorCore.proof_of_ownership)
    probe_interval_s: float = 0.0
    # > 0: a change the arbiter must record (a replica dropped or back in sync) that is not
    # recorded after this long fails I/O (EIO) until it is; 0: I/O waits for it
    arbiter_wait_s: float = 0.0
    node_safety: bool = True  # PR_SET_IO_FLUSHER, mlockall, oom_score_adj -1000
    # how long the C loop may keep serving FUSE and replica events before the worker's
    # Python loop (timers, guard, reporter) runs again; it always does at once after any
    # Python callback. 0: after every round of events (about 5 us more per write at QD1)
    poll_spin_ms: int = 2


@dataclass(frozen=True)
class FrontendConfig:
    volume_id: str
    size_bytes: int
    replicas: tuple[ReplicaAddr, ...]
    state_dir: str
    key_path: str
    arbiter_url: str  # e.g. sqlite:/var/lib/tandem/arbiter.db
    netns: str | None = None  # network namespace the data path runs in (tests, zones)
    tuning: FrontendTuning = field(default_factory=FrontendTuning)
    preferred_read_replica: str | None = None  # the node-local replica, when there is one
    # The generation this frontend was published at (the controller bumped it at attach):
    # ownership is taken at exactly that generation and refused if the arbiter holds a newer
    # one. 0: take the next generation itself (a frontend with no controller: tests, tools).
    generation: int = 0
