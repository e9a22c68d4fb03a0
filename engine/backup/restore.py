"""Restoring a backup into a file (a new volume's backing file), every blob checked.

The manifest alone says what to fetch: its blobs grouped by pack and read with ranged
GETs of up to FETCH_BYTES (neighbouring blobs in one request), a few requests at a time.
Each blob is authenticated (AES-GCM) and its content address recomputed before any of its
bytes reach the file; a damaged or missing blob fails the restore with DataLoss naming it.
Holes are left as they are (the file is new and sparse). The file is fsync'd at the end.
`verify()` does the same reading without writing: `tandem-admin backup verify`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.backup.manifest import Extent, Manifest
from engine.backup.repo import Repository
from engine.backup.upload import Canceled, Progress

MIB = 1024 * 1024
FETCH_BYTES = 16 * MIB
FETCH_THREADS = 4


@dataclass(frozen=True)
class Fetch:
    """One ranged GET: blobs lying back to back in one pack."""

    pack: str
    start: int
    end: int
    blobs: tuple[bytes, ...]


def fetches(manifest: Manifest) -> list[Fetch]:
    by_pack: dict[str, list[bytes]] = {}
    for blob in {e.blob for e in manifest.extents}:
        by_pack.setdefault(manifest.blobs[blob].pack, []).append(blob)
    out = []
    for pack in sorted(by_pack):
        blobs = sorted(by_pack[pack], key=lambda b: manifest.blobs[b].offset_bytes)
        group: list[bytes] = []
        start = end = 0
        for b in blobs:
            loc = manifest.blobs[b]
            if group and (loc.offset_bytes != end
                          or loc.offset_bytes + loc.sealed_bytes - start > FETCH_BYTES):
                out.append(Fetch(pack, start, end, tuple(group)))
                group = []
            if not group:
                start = loc.offset_bytes
            group.append(b)
            end = loc.offset_bytes + loc.sealed_bytes
        if group:
            out.append(Fetch(pack, start, end, tuple(group)))
    return out


def _extents_by_blob(manifest: Manifest) -> dict[bytes, list[Extent]]:
    out: dict[bytes, list[Extent]] = {}
    for e in manifest.extents:
        out.setdefault(e.blob, []).append(e)
    return out


def read_back(repo: Repository, manifest: Manifest,
              write: Callable[[Extent, memoryview], None], progress: Progress,
              cancel: threading.Event | None = None) -> None:
    """Fetch and check every blob of the manifest; hand each extent's bytes to write."""
    by_blob = _extents_by_blob(manifest)
    progress.bytes_total = manifest.data_bytes
    progress.bytes_done = 0
    lock = threading.Lock()

    def one(fetch: Fetch) -> None:
        if cancel is not None and cancel.is_set():
            raise Canceled()
        data = memoryview(repo.read_pack_range(fetch.pack, fetch.start, fetch.end))
        done = 0
        for blob in fetch.blobs:
            loc = manifest.blobs[blob]
            at = loc.offset_bytes - fetch.start
            plain = memoryview(repo.open_blob(blob, loc, data[at:at + loc.sealed_bytes]))
            for e in by_blob[blob]:
                write(e, plain[e.blob_offset_bytes:e.blob_offset_bytes + e.length_bytes])
                done += e.length_bytes
        with lock:
            progress.bytes_done += done

    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="backup-fetch") as pool:
        # map() keeps at most the pool's threads busy; results are checked in order, so
        # the first failure is raised (and the rest are cancelled)
        try:
            for _ in pool.map(one, fetches(manifest)):
                pass
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def restore_into(repo: Repository, manifest: Manifest, path: str, progress: Progress,
                 cancel: threading.Event | None = None) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size < manifest.size_bytes:
            raise ValueError(f"{path} is smaller than the backup's volume")

        def write(e: Extent, data: memoryview) -> None:
            os.pwrite(fd, data, e.offset_bytes)

        read_back(repo, manifest, write, progress, cancel)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(repo: Repository, backup_id: str) -> dict:
    """Read a backup back and check every blob; DataLoss on the first bad one."""
    manifest = repo.read_manifest(backup_id)
    progress = Progress()
    read_back(repo, manifest, lambda e, d: None, progress)
    return {"backup_id": backup_id, "volume_id": manifest.volume_id,
            "size_bytes": manifest.size_bytes, "data_bytes": progress.bytes_done,
            "extents": len(manifest.extents), "blobs": len({e.blob for e in manifest.extents}),
            "packs": len(manifest.packs()), "ok": True}
