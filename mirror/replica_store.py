"""One replica of one volume on the replica node's disk.

Layout under <pool>/<volume_id>/:
  data       sparse file, the volume's bytes
  meta.json  schema, size, generation, whether dirty tracking is on (atomic replace)
  dirty.map  1 byte per REGION_BYTES: written while some peer was out of sync
  al.map     1 byte per AL_EXTENT_BYTES: activity log (regions maybe in flight)

Map bytes are set with in-place pwrite + fdatasync before the writes they cover
are applied; clears are lazy (flushed on SYNC), since a stale set bit only costs
a needless copy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterable

from engine.errors import AlreadyExists, InvalidSpec, NotFound
from engine.fileops import fsync_dir

from . import durable
from .spec import AL_EXTENT_BYTES, REGION_BYTES

SCHEMA_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def check_volume_id(volume_id: str) -> str:
    if not _ID_RE.match(volume_id):
        raise InvalidSpec(f"bad volume id {volume_id!r}")
    return volume_id


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, count: int) -> None:
    """os has only posix_fallocate; hole punching needs the Linux call."""
    if _libc.fallocate(fd, mode, offset, count) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReplicaVolume:
    def __init__(self, path: str):
        self.path = path
        meta = durable.read_json(os.path.join(path, "meta.json"))
        if meta.get("schema") != SCHEMA_VERSION:
            raise InvalidSpec(f"{path}: unknown schema {meta.get('schema')}")
        self.volume_id: str = meta["volume_id"]
        self.size_bytes: int = meta["size_bytes"]
        self.generation: int = meta["generation"]
        self.tracking: bool = meta["tracking"]
        self.region_bytes = REGION_BYTES
        self.lock = threading.Lock()  # metadata only; data pwrites run unlocked
        self.fd = os.open(os.path.join(path, "data"), os.O_RDWR)
        self._dirty_fd = os.open(os.path.join(path, "dirty.map"), os.O_RDWR)
        self._al_fd = os.open(os.path.join(path, "al.map"), os.O_RDWR)
        self.dirty = bytearray(os.pread(self._dirty_fd, self.regions, 0))
        self.al = bytearray(os.pread(self._al_fd, self.extents, 0))
        self._maps_unsynced = False
        self.writer_epoch = 0  # in memory: which data link may write (see replica_server)
        self._batches = 0  # batches being applied right now (see wait_for_batches)
        # a plain Lock: begin/end run for every received batch, and Condition's own
        # __enter__/notify_all are Python code; notify only when someone waits
        self._batch_lock = threading.Lock()
        self._batches_done = threading.Condition(self._batch_lock)
        self._batch_waiters = 0

    @property
    def regions(self) -> int:
        return _ceil_div(self.size_bytes, REGION_BYTES)

    @property
    def extents(self) -> int:
        return _ceil_div(self.size_bytes, AL_EXTENT_BYTES)

    # --- lifecycle -------------------------------------------------------
    @classmethod
    def create(cls, pool_dir: str, volume_id: str, size_bytes: int,
               data_path: str = "") -> ReplicaVolume:
        """A new replica. data_path: its bytes live in that existing file (a volume of the
        node's own pool, so a replica is counted and snapshotted like any volume); the
        replica keeps a link to it beside its maps. Else a sparse file of its own."""
        check_volume_id(volume_id)
        if size_bytes <= 0 or size_bytes % 4096:
            raise InvalidSpec(f"size {size_bytes} is not a positive multiple of 4096")
        path = os.path.join(pool_dir, volume_id)
        if os.path.exists(os.path.join(path, "meta.json")):
            raise AlreadyExists(volume_id)
        os.makedirs(path, exist_ok=True)
        data = os.path.join(path, "data")
        if data_path:
            if os.path.getsize(data_path) < size_bytes:
                raise InvalidSpec(f"{data_path} is smaller than {size_bytes} bytes")
            if os.path.lexists(data):
                os.unlink(data)
            os.symlink(data_path, data)
            fsync_dir(path)
        else:
            with open(data, "wb") as f:
                f.truncate(size_bytes)
                os.fsync(f.fileno())
        for name, n in (("dirty.map", _ceil_div(size_bytes, REGION_BYTES)),
                        ("al.map", _ceil_div(size_bytes, AL_EXTENT_BYTES))):
            with open(os.path.join(path, name), "wb") as f:
                f.truncate(n)
                os.fsync(f.fileno())
        meta = {"schema": SCHEMA_VERSION, "volume_id": volume_id, "size_bytes": size_bytes,
                "generation": 0, "tracking": False}
        durable.write_json(os.path.join(path, "meta.json"), meta)  # last: marks it complete
        return cls(path)

    @classmethod
    def open(cls, pool_dir: str, volume_id: str) -> ReplicaVolume:
        path = os.path.join(pool_dir, check_volume_id(volume_id))
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise NotFound(volume_id)
        return cls(path)

    @staticmethod
    def delete(pool_dir: str, volume_id: str) -> None:
        shutil.rmtree(os.path.join(pool_dir, check_volume_id(volume_id)), ignore_errors=True)

    def close(self) -> None:
        self.flush_maps()  # lazy clears would otherwise be lost with the last connection
        for fd in (self.fd, self._dirty_fd, self._al_fd):
            os.close(fd)

    def _save_meta(self) -> None:
        durable.write_json(os.path.join(self.path, "meta.json"), {
            "schema": SCHEMA_VERSION, "volume_id": self.volume_id, "size_bytes": self.size_bytes,
            "generation": self.generation, "tracking": self.tracking})

    # --- generation ------------------------------------------------------
    def raise_generation(self, generation: int) -> None:
        with self.lock:
            if generation > self.generation:
                self.generation = generation
                self._save_meta()

    # --- batches -----------------------------------------------------------
    def begin_batch(self) -> None:
        with self._batch_lock:
            self._batches += 1

    def end_batch(self) -> None:
        with self._batch_lock:
            self._batches -= 1
            if self._batches == 0 and self._batch_waiters:
                self._batches_done.notify_all()

    def wait_for_batches(self, timeout_s: float = 30.0) -> bool:
        """Wait until no batch is being applied: one that passed its generation check
        before a newer frontend raised the generation lands before that frontend goes on."""
        with self._batches_done:
            self._batch_waiters += 1
            try:
                return self._batches_done.wait_for(lambda: self._batches == 0, timeout_s)
            finally:
                self._batch_waiters -= 1

    # --- data ------------------------------------------------------------
    def check_range(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size_bytes:
            raise InvalidSpec(f"range {offset}+{count} outside {self.size_bytes}")

    def punch(self, offset: int, count: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)

    def zero(self, offset: int, count: int) -> None:
        # punching also reads back zeros and frees space; the data file is ours alone
        self.punch(offset, count)

    def is_hole(self, offset: int, count: int) -> bool:
        try:
            nxt = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return True
        return nxt >= offset + count

    def sync(self) -> None:
        os.fdatasync(self.fd)
        self.flush_maps()

    def flush_maps(self) -> None:
        with self.lock:
            if self._maps_unsynced:
                os.pwrite(self._dirty_fd, self.dirty, 0)
                os.pwrite(self._al_fd, self.al, 0)
                os.fdatasync(self._dirty_fd)
                os.fdatasync(self._al_fd)
                self._maps_unsynced = False

    def checksum(self, offset: int, count: int) -> bytes:
        h = hashlib.sha256()
        end = offset + count
        while offset < end:
            chunk = os.pread(self.fd, min(4 << 20, end - offset), offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
        return h.digest()

    # --- maps --------------------------------------------------------------
    def _set_bytes(self, fd: int, table: bytearray, idx: Iterable[int], limit: int) -> None:
        """Set entries and make them durable before returning (write-intent)."""
        lo, hi = limit, -1
        for i in idx:
            if not 0 <= i < limit:
                raise InvalidSpec(f"map index {i} outside {limit}")
            if not table[i]:
                table[i] = 1
                lo, hi = min(lo, i), max(hi, i)
        if hi >= 0:
            os.pwrite(fd, table[lo:hi + 1], lo)
            os.fdatasync(fd)

    def mark_dirty(self, regions: Iterable[int]) -> None:
        with self.lock:
            self._set_bytes(self._dirty_fd, self.dirty, regions, self.regions)

    def mark_dirty_range(self, offset: int, count: int) -> None:
        if count:
            self.mark_dirty(range(offset // REGION_BYTES, (offset + count - 1) // REGION_BYTES + 1))

    def start_tracking(self) -> None:
        with self.lock:
            if not self.tracking:
                self.tracking = True
                self._save_meta()

    def clear_dirty(self, regions: Iterable[int] | None) -> None:
        """None: clear all and stop tracking (the last out-of-sync peer is back)."""
        with self.lock:
            if regions is None:
                self.dirty[:] = bytes(len(self.dirty))
                os.pwrite(self._dirty_fd, self.dirty, 0)
                os.fdatasync(self._dirty_fd)
                if self.tracking:
                    self.tracking = False
                    self._save_meta()
                return
            for r in regions:
                if 0 <= r < len(self.dirty):
                    self.dirty[r] = 0
            self._maps_unsynced = True

    def al_add(self, extents: Iterable[int]) -> None:
        with self.lock:
            self._set_bytes(self._al_fd, self.al, extents, self.extents)

    def al_remove(self, extents: Iterable[int]) -> None:
        with self.lock:
            for e in extents:
                if 0 <= e < len(self.al):
                    self.al[e] = 0
            self._maps_unsynced = True

    # --- size --------------------------------------------------------------------
    def grow(self, size_bytes: int) -> None:
        """Grow to size_bytes (an online expansion; never shrinks). The bytes first (the
        node's pool volume is usually grown already: then nothing to do), then both maps
        (their new entries are clear: the new range is zeros on every replica), then the
        metadata, which makes it final. A crash in between leaves longer files than the
        metadata says, which opening ignores and a retry completes."""
        if size_bytes % 4096:
            raise InvalidSpec(f"size {size_bytes} is not a multiple of 4096")
        with self.lock:
            if size_bytes <= self.size_bytes:
                return
            if os.fstat(self.fd).st_size < size_bytes:
                os.ftruncate(self.fd, size_bytes)
                os.fsync(self.fd)
            regions = _ceil_div(size_bytes, REGION_BYTES)
            extents = _ceil_div(size_bytes, AL_EXTENT_BYTES)
            for fd, table, n in ((self._dirty_fd, self.dirty, regions),
                                 (self._al_fd, self.al, extents)):
                os.ftruncate(fd, n)
                os.fsync(fd)
                table.extend(bytes(n - len(table)))
            self.size_bytes = size_bytes
            self._save_meta()

    def info(self) -> dict:
        return {"volume_id": self.volume_id, "size_bytes": self.size_bytes,
                "generation": self.generation, "region_bytes": REGION_BYTES,
                "al_extent_bytes": AL_EXTENT_BYTES, "tracking": self.tracking,
                "dirty_regions": self.dirty.count(1), "al_extents": self.al.count(1)}
