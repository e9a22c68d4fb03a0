"""A backup's manifest: the full index of the volume at the snapshot's instant.

Every backup has one, incremental or not: which byte ranges of the volume hold data and
where that data sits (extent -> blob, offset in the blob; blob -> pack, offset, length,
content address). Ranges no extent covers read as zeros (holes are never uploaded). Any
backup therefore restores on its own, without walking a chain, and deleting one backup
touches no other's manifest. The manifest is the last object a backup writes: a backup
without one is incomplete, whatever packs it left.

Encoding (then compressed and sealed as one blob, crypto.py): b"TDMMAN1\\n", a u32
length and a JSON header, then the blob table ("<32sIQII": content id, pack index, offset
in pack, sealed length, plain length) and the extents ("<QIII": volume offset, length,
blob index, offset in the blob), each preceded by a u32 count.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

MAGIC = b"TDMMAN1\n"
FORMAT = 1
_BLOB = struct.Struct("<32sIQII")
_EXTENT = struct.Struct("<QIII")
_COUNT = struct.Struct("<I")


@dataclass(frozen=True)
class BlobLocation:
    pack: str  # the pack's name (its SHA-256, hex)
    offset_bytes: int
    sealed_bytes: int
    plain_bytes: int


@dataclass(frozen=True)
class Extent:
    offset_bytes: int  # in the volume
    length_bytes: int
    blob: bytes  # content id
    blob_offset_bytes: int  # where the extent's data starts in the blob's plaintext

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.length_bytes


@dataclass
class Manifest:
    backup_id: str
    volume_id: str  # the source volume, in the cluster that made it
    size_bytes: int
    created_at: float  # the snapshot's instant
    base_backup_id: str = ""  # what the upload was incremental to ("": full)
    extents: list[Extent] = field(default_factory=list)
    blobs: dict[bytes, BlobLocation] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(e.length_bytes for e in self.extents)

    def packs(self) -> set[str]:
        return {self.blobs[e.blob].pack for e in self.extents}

    def check(self) -> None:
        """Extents sorted, disjoint, inside the volume, each in a known blob."""
        end = 0
        for e in self.extents:
            if e.offset_bytes < end or e.end_bytes > self.size_bytes or e.length_bytes <= 0:
                raise ValueError(f"extent at {e.offset_bytes} overlaps or lies outside")
            loc = self.blobs.get(e.blob)
            if loc is None or e.blob_offset_bytes + e.length_bytes > loc.plain_bytes:
                raise ValueError(f"extent at {e.offset_bytes} points outside its blob")
            end = e.end_bytes

    def encode(self) -> bytes:
        used = sorted({e.blob for e in self.extents})
        blob_index = {b: i for i, b in enumerate(used)}
        packs = sorted({self.blobs[b].pack for b in used})
        pack_index = {p: i for i, p in enumerate(packs)}
        header = json.dumps({
            "format": FORMAT, "backup_id": self.backup_id, "volume_id": self.volume_id,
            "size_bytes": self.size_bytes, "created_at": self.created_at,
            "base_backup_id": self.base_backup_id, "packs": packs, "stats": self.stats,
        }, sort_keys=True).encode()
        parts = [MAGIC, _COUNT.pack(len(header)), header, _COUNT.pack(len(used))]
        for b in used:
            loc = self.blobs[b]
            parts.append(_BLOB.pack(b, pack_index[loc.pack], loc.offset_bytes,
                                    loc.sealed_bytes, loc.plain_bytes))
        parts.append(_COUNT.pack(len(self.extents)))
        parts.extend(_EXTENT.pack(e.offset_bytes, e.length_bytes, blob_index[e.blob],
                                  e.blob_offset_bytes) for e in self.extents)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """ValueError for anything that is not a whole, consistent manifest."""
        try:
            return cls._decode(data)
        except (struct.error, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"manifest is malformed: {e}") from None

    @classmethod
    def _decode(cls, data: bytes) -> Manifest:
        if not data.startswith(MAGIC):
            raise ValueError("not a Tandem backup manifest")
        pos = len(MAGIC)
        (n,) = _COUNT.unpack_from(data, pos)
        header = json.loads(data[pos + 4:pos + 4 + n])
        if header.get("format") != FORMAT:
            raise ValueError(f"manifest format {header.get('format')} is not supported")
        pos += 4 + n
        packs = header["packs"]
        (count,) = _COUNT.unpack_from(data, pos)
        pos += 4
        ids: list[bytes] = []
        blobs: dict[bytes, BlobLocation] = {}
        for blob, pack, offset, sealed, plain in _BLOB.iter_unpack(
                data[pos:pos + count * _BLOB.size]):
            ids.append(blob)
            blobs[blob] = BlobLocation(packs[pack], offset, sealed, plain)
        pos += count * _BLOB.size
        (count,) = _COUNT.unpack_from(data, pos)
        pos += 4
        extents = [Extent(off, length, ids[b], boff) for off, length, b, boff in
                   _EXTENT.iter_unpack(data[pos:pos + count * _EXTENT.size])]
        if pos + count * _EXTENT.size != len(data):
            raise ValueError("manifest has trailing or missing bytes")
        manifest = cls(header["backup_id"], header["volume_id"], header["size_bytes"],
                       header["created_at"], header["base_backup_id"], extents, blobs,
                       header.get("stats", {}))
        manifest.check()
        return manifest


def without(extents: list[Extent], ranges: Iterable[tuple[int, int]]) -> list[Extent]:
    """The extents with the (offset, length) ranges cut out (what changed since a base:
    new data replaces it, or it became a hole). Both inputs sorted by offset."""
    cuts = sorted((o, o + n) for o, n in ranges if n > 0)
    out: list[Extent] = []
    i = 0
    for e in extents:
        start, end = e.offset_bytes, e.end_bytes
        while i < len(cuts) and cuts[i][1] <= start:
            i += 1
        j = i
        while start < end:
            if j >= len(cuts) or cuts[j][0] >= end:
                out.append(_piece(e, start, end))
                break
            cut_start, cut_end = cuts[j]
            if cut_start > start:
                out.append(_piece(e, start, cut_start))
            start = max(start, cut_end)
            j += 1
    return out


def _piece(e: Extent, start: int, end: int) -> Extent:
    return Extent(start, end - start, e.blob, e.blob_offset_bytes + (start - e.offset_bytes))
