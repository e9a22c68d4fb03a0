"""Byte-per-entry maps (dirty regions, activity-log extents): union, listing, wire payloads.

A map is a bytearray with one byte per region (or extent), 1 = set. Maps come
from the replicas (GET_MAPS) and from the frontend's own bookkeeping.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator

_NONZERO = bytes([0] + [1] * 255)  # translate table: any set byte reads as 1
_RUNS = re.compile(rb"\x01+")
MAX_U32S_PER_MESSAGE = 1 << 20  # 4 MiB of payload, well under the wire's 8 MiB
assert array("I").itemsize == 4


def union_into(dst: bytearray, src: bytes | bytearray | memoryview) -> None:
    """dst |= src over dst's length (src may be longer or shorter)."""
    n = len(dst)
    part = bytes(src[:n]).translate(_NONZERO).ljust(n, b"\0")
    dst[:] = (int.from_bytes(dst, "little") | int.from_bytes(part, "little")).to_bytes(
        n, "little")


def any_set(m: bytes | bytearray) -> bool:
    return m.find(1) >= 0


def runs(m: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(first, last + 1) of every run of set entries."""
    for r in _RUNS.finditer(bytes(m).translate(_NONZERO)):
        yield r.start(), r.end()


def indices(m: bytes | bytearray) -> list[int]:
    out: list[int] = []
    for a, b in runs(m):
        out.extend(range(a, b))
    return out


def extents_to_regions(al: bytes | bytearray, regions: int, per_extent: int) -> bytearray:
    """The regions covered by the set extents of an activity-log map."""
    out = bytearray(regions)
    for a, b in runs(al):
        out[a * per_extent : min(b * per_extent, regions)] = b"\1" * (
            min(b * per_extent, regions) - a * per_extent)
    return out


def u32_payloads(m: bytes | bytearray) -> list[bytes]:
    """The set entries as little-endian u32 lists, split to fit one message each."""
    out: list[bytes] = []
    cur = array("I")
    for a, b in runs(m):
        while a < b:
            take = min(b - a, MAX_U32S_PER_MESSAGE - len(cur))
            cur.extend(range(a, a + take))
            a += take
            if len(cur) == MAX_U32S_PER_MESSAGE:
                out.append(_le(cur))
                cur = array("I")
    if cur:
        out.append(_le(cur))
    return out


def _le(a: array) -> bytes:
    if array("I", [1]).tobytes()[0] != 1:  # big-endian host: the wire is little-endian
        a.byteswap()
    return a.tobytes()
