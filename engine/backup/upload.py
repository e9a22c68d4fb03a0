"""Uploading a snapshot: only the changed blocks, packed, sealed, resumable.

The plan: against a base (the last backed-up local snapshot and its manifest), the data
to send is what the extent maps say changed (engine/changed_blocks.py: filesystem-block
granularity, 4 KiB here) and the target still holds; the base manifest's extents outside
the changed ranges are kept as they are. Without a base, everything the snapshot holds.
Holes are never read or sent.

The data is cut at 1 MiB-aligned windows: all of one window's data becomes one blob (its
pieces back to back; extents point into it), compressed and sealed on its own (crypto.py).
Blobs fill packs of about 16 MiB, uploaded by a few threads while the next pack fills
(memory: at most MAX_PACKS_IN_FLIGHT packs). After each pack is durable a checkpoint
names its blobs and the extents it completed; a restarted upload skips the windows its
checkpoints cover. The manifest, the full index, goes last.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine import changed_blocks
from engine.backup.manifest import BlobLocation, Extent, Manifest, without
from engine.backup.repo import Lock, Repository

MIB = 1024 * 1024
WINDOW_BYTES = 1 * MIB
PACK_BYTES = 16 * MIB
UPLOAD_THREADS = 3
SEAL_THREADS = 2
SEAL_AHEAD = 8  # windows read ahead of the pack being filled (8 MiB at most)
MAX_PACKS_IN_FLIGHT = 4


class Canceled(Exception):
    """The job was asked to stop (its snapshot is being deleted, or the driver stops)."""


@dataclass(frozen=True)
class Plan:
    size_bytes: int
    data: list[tuple[int, int]]  # (offset, length) to read and send, sorted
    kept: list[Extent]  # from the base manifest, unchanged
    known: dict[bytes, BlobLocation]  # blobs already in the bucket (the base's)
    base_backup_id: str = ""

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.data)


def plan(snapshot_path: str, size_bytes: int, base_path: str = "",
         base: Manifest | None = None) -> Plan:
    target = changed_blocks.written_extents(snapshot_path)  # one extent map, two uses
    allocated = [(r.offset_bytes, r.length_bytes)
                 for r in changed_blocks.allocated_of_extents(target)]
    if not base_path or base is None:
        return Plan(size_bytes, allocated, [], {})
    changed = [(r.offset_bytes, r.length_bytes) for r in changed_blocks.delta_of_extents(
        changed_blocks.written_extents(base_path), target)]
    kept = without(base.extents, changed)
    return Plan(size_bytes, intersect(changed, allocated), kept, dict(base.blobs),
                base.backup_id)


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted, disjoint range lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if start < end:
            out.append((start, end - start))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def windows(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(window index, the pieces of the ranges inside it), in order."""
    current, pieces = -1, []  # type: tuple[int, list[tuple[int, int]]]
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            w = offset // WINDOW_BYTES
            piece_end = min(end, (w + 1) * WINDOW_BYTES)
            if w != current:
                if pieces:
                    yield current, pieces
                current, pieces = w, []
            pieces.append((offset, piece_end - offset))
            offset = piece_end
    if pieces:
        yield current, pieces


@dataclass
class Checkpoint:
    """One durable pack and the extents completed with it (JSON-able for the node store).
    pack "" holds only extents whose blobs were already in the bucket."""

    pack: str
    blobs: dict[str, list[int]] = field(default_factory=dict)  # id hex -> [off, sealed, plain]
    extents: list[list] = field(default_factory=list)  # [offset, length, id hex, blob offset]

    def to_value(self) -> dict:
        return {"pack": self.pack, "blobs": self.blobs, "extents": self.extents}

    @classmethod
    def from_value(cls, value: dict) -> Checkpoint:
        return cls(value["pack"], value["blobs"], value["extents"])


@dataclass
class Progress:
    bytes_total: int = 0
    bytes_done: int = 0  # data read, sealed and durable (or found already there)
    bytes_uploaded: int = 0  # what went over the wire (packs and manifest)


class Uploader:
    def __init__(self, repo: Repository, snapshot_path: str, the_plan: Plan, *,
                 backup_id: str, volume_id: str, created_at: float,
                 checkpoints: list[Checkpoint], save: Callable[[Checkpoint], None],
                 progress: Progress, cancel: threading.Event):
        self.repo = repo
        self.path = snapshot_path
        self.plan = the_plan
        self.backup_id = backup_id
        self.volume_id = volume_id
        self.created_at = created_at
        self.save = save
        self.progress = progress
        self.cancel = cancel
        self._lock = threading.Lock()
        self.known: dict[bytes, BlobLocation] = dict(the_plan.known)
        self.extents: list[Extent] = []
        for cp in checkpoints:  # what a run cut short already made durable
            self._note(cp)

    def _note(self, cp: Checkpoint) -> None:
        for blob_hex, (off, sealed, plain) in cp.blobs.items():
            self.known[bytes.fromhex(blob_hex)] = BlobLocation(cp.pack, off, sealed, plain)
        self.extents.extend(Extent(o, n, bytes.fromhex(b), bo) for o, n, b, bo in cp.extents)

    def run(self) -> Manifest:
        done_windows = {e.offset_bytes // WINDOW_BYTES for e in self.extents}
        self.progress.bytes_total = self.plan.data_bytes
        self.progress.bytes_done = sum(e.length_bytes for e in self.extents)
        lock = self.repo.lock_upload(self.backup_id)
        try:
            self._upload(done_windows, lock)
            manifest = self._manifest()
            self.progress.bytes_uploaded += self.repo.write_manifest(manifest)
        finally:
            self.repo.release_lock(lock)
        return manifest

    def _upload(self, done_windows: set[int], lock: Lock) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        sealers = ThreadPoolExecutor(SEAL_THREADS, thread_name_prefix="backup-seal")
        pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="backup-upload")
        in_flight: list[Future] = []
        slots = threading.Semaphore(MAX_PACKS_IN_FLIGHT)
        # windows read in order, sealed by a few threads (hashing, zstd and AES-GCM leave
        # the GIL), taken into packs in order again
        sealing: collections.deque[tuple[list[tuple[int, int]], Future]] = collections.deque()
        pack = _PackBuilder()

        def take_one() -> None:
            nonlocal pack, in_flight, lock
            pieces, future = sealing.popleft()
            blob, sealed, plain_bytes = future.result()
            self._add_window(pieces, blob, sealed, plain_bytes, pack)
            if pack.size >= PACK_BYTES:
                in_flight = self._send(pool, slots, in_flight, pack)
                pack = _PackBuilder()
                lock = self.repo.refresh_lock(lock)

        try:
            for w, pieces in windows(self.plan.data):
                if w in done_windows:
                    continue
                if self.cancel.is_set():
                    raise Canceled()
                sealing.append((pieces, sealers.submit(self._seal, self._read(fd, pieces))))
                if len(sealing) >= SEAL_AHEAD:
                    take_one()
            while sealing:
                take_one()
            if pack.extents:
                in_flight = self._send(pool, slots, in_flight, pack)
            for f in in_flight:
                f.result()
        finally:
            sealers.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)

    @staticmethod
    def _read(fd: int, pieces: list[tuple[int, int]]) -> bytes:
        start, end = pieces[0][0], pieces[-1][0] + pieces[-1][1]
        if 2 * sum(n for _, n in pieces) >= end - start:
            # mostly data: one read of the window's span, the pieces cut out of it
            span = memoryview(os.pread(fd, end - start, start))
            return b"".join(span[o - start:o - start + n] for o, n in pieces)
        return b"".join(os.pread(fd, n, o) for o, n in pieces)

    def _seal(self, data: bytes) -> tuple[bytes, bytes, int]:
        """(content id, sealed blob, plain length) of one window's data."""
        blob = self.repo.keys.content_id(data)
        return blob, self.repo.keys.seal(data, blob), len(data)

    def _add_window(self, pieces: list[tuple[int, int]], blob: bytes, sealed: bytes,
                    plain_bytes: int, pack: _PackBuilder) -> None:
        at = 0
        for o, n in pieces:
            pack.extents.append([o, n, blob.hex(), at])
            at += n
        with self._lock:
            known = blob in self.known
        if not known and blob.hex() not in pack.blobs:
            pack.add_blob(blob, sealed, plain_bytes)
        pack.data_bytes += plain_bytes

    def _send(self, pool: ThreadPoolExecutor, slots: threading.Semaphore,
              in_flight: list[Future], pack: _PackBuilder) -> list[Future]:
        while not slots.acquire(timeout=0.5):
            if self.cancel.is_set():
                raise Canceled()
        for f in in_flight:
            if f.done():
                f.result()  # a pack that failed stops the job now
        future = pool.submit(self._store_pack, pack)
        future.add_done_callback(lambda _: slots.release())
        return [f for f in in_flight if not f.done()] + [future]

    def _store_pack(self, pack: _PackBuilder) -> None:
        name = self.repo.write_pack(b"".join(pack.parts)) if pack.parts else ""
        cp = Checkpoint(name, {b: [off, sealed, plain] for b, (off, sealed, plain)
                               in pack.blobs.items()}, pack.extents)
        self.save(cp)  # durable in the node's store before it counts
        with self._lock:
            self._note(cp)
            self.progress.bytes_done += pack.data_bytes
            self.progress.bytes_uploaded += pack.size

    def _manifest(self) -> Manifest:
        extents = sorted(self.plan.kept + self.extents, key=lambda e: e.offset_bytes)
        used = {e.blob for e in extents}
        manifest = Manifest(self.backup_id, self.volume_id, self.plan.size_bytes,
                            self.created_at, self.plan.base_backup_id, extents,
                            {b: self.known[b] for b in used},
                            {"data_bytes": sum(e.length_bytes for e in extents),
                             "uploaded_bytes": self.progress.bytes_uploaded})
        return manifest


class _PackBuilder:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.blobs: dict[str, tuple[int, int, int]] = {}  # id hex -> (offset, sealed, plain)
        self.extents: list[list] = []
        self.data_bytes = 0

    def add_blob(self, blob: bytes, sealed: bytes, plain_bytes: int) -> None:
        self.blobs[blob.hex()] = (self.size, len(sealed), plain_bytes)
        self.parts.append(sealed)
        self.size += len(sealed)
