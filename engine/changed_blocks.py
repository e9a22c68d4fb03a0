"""Changed-block tracking from the filesystem's extent maps, without reading the data.

`allocated()` lists the byte ranges a snapshot holds data in; `delta()` the ranges that
differ between two snapshots of one volume: wherever the two files do not map the same
offset to the same physical block (shared extents are the unchanged data), including
ranges the newer one no longer has at all (discarded: they now read as zeros).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.fileops import Extent, extents


@dataclass(frozen=True)
class Range:
    offset_bytes: int
    length_bytes: int

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.length_bytes


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for r in ranges:
        if out and out[-1].end_bytes >= r.offset_bytes:
            last = out[-1]
            out[-1] = Range(last.offset_bytes, max(last.end_bytes, r.end_bytes) - last.offset_bytes)
        else:
            out.append(r)
    return out


def written_extents(path: str) -> list[Extent]:
    """The file's extents that hold data, for callers that ask several questions of one
    map (allocated_of_extents, delta_of_extents) without reading it again."""
    # unwritten (preallocated) extents read as zeros: they hold no data
    return [e for e in extents(path) if e.written]


def allocated_of_extents(exts: list[Extent]) -> list[Range]:
    return _merge([Range(e.offset_bytes, e.length_bytes) for e in exts])


def allocated(path: str) -> list[Range]:
    return allocated_of_extents(written_extents(path))


def _mapper(exts: list[Extent]):
    starts = [e.offset_bytes for e in exts]

    def physical_at(offset: int) -> int | None:
        i = bisect.bisect_right(starts, offset) - 1
        if i >= 0 and offset < exts[i].offset_bytes + exts[i].length_bytes:
            return exts[i].physical_bytes + (offset - exts[i].offset_bytes)
        return None

    return physical_at


def delta_of_extents(base: list[Extent], target: list[Extent]) -> list[Range]:
    points = sorted({p for e in base + target
                     for p in (e.offset_bytes, e.offset_bytes + e.length_bytes)})
    base_at, target_at = _mapper(base), _mapper(target)
    changed = []
    for start, end in zip(points, points[1:], strict=False):
        # within a segment both maps are linear (or absent): compare at its start
        if base_at(start) != target_at(start):
            changed.append(Range(start, end - start))
    return _merge(changed)


def delta(base_path: str, target_path: str) -> list[Range]:
    return delta_of_extents(written_extents(base_path), written_extents(target_path))
