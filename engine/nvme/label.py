"""A small Tandem label in a namespace's last blocks: whose the namespace is.

The node's store maps volumes to namespaces; the label lets that mapping be rebuilt when
the store is lost (a node reinstalled, its disk replaced), and tells Tandem's namespaces
from anyone else's. It is one 4 KiB block (a multiple of both LBA sizes in use) at the
start of the namespace's last LABEL_AREA_BYTES; volumes never cover that area: a
filesystem Tandem makes stops before it, and a block volume is told its size (a
consumer writing past the size it asked for can overwrite the label; that namespace is
then no longer recognised as Tandem's, and is reported, never reused or deleted).

Layout: magic (8 bytes), version (u32), payload length (u32), CRC-32 of the payload
(u32), JSON payload, zero padding. Read and written with O_DIRECT, so the block device's
page cache can never hide what the drive holds.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field

from engine.errors import InvalidSpec

MAGIC = b"TANDEMNS"
VERSION = 1
LABEL_BYTES = 4096
LABEL_AREA_BYTES = 1024 * 1024  # kept out of every volume, aligned for any LBA size
_HEADER = struct.Struct("<8sIII")
VOLUME, FREE, MEASURE = "volume", "free", "measure"


@dataclass(frozen=True)
class Label:
    state: str  # VOLUME (the namespace holds a volume), FREE (wiped, in the pool), MEASURE
    volume_id: str = ""
    size_bytes: int = 0
    access_types: tuple[str, ...] = ()
    created_at: float = 0.0
    sector_size_bytes: int = 0
    node_id: str = ""
    extra: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        payload = json.dumps({**asdict(self), "access_types": list(self.access_types)},
                             sort_keys=True).encode()
        head = _HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload))
        block = head + payload
        if len(block) > LABEL_BYTES:
            raise InvalidSpec(f"label of {len(block)} bytes does not fit {LABEL_BYTES}")
        return block.ljust(LABEL_BYTES, b"\0")

    @classmethod
    def decode(cls, block: bytes) -> Label | None:
        """The label in block, None when there is none (or it is damaged)."""
        if len(block) < _HEADER.size:
            return None
        magic, version, length, crc = _HEADER.unpack_from(block, 0)
        if magic != MAGIC or version != VERSION or length > LABEL_BYTES - _HEADER.size:
            return None
        payload = block[_HEADER.size:_HEADER.size + length]
        if zlib.crc32(payload) != crc:
            return None
        try:
            doc = json.loads(payload)
            doc["access_types"] = tuple(doc.get("access_types", ()))
            return cls(**doc)
        except (ValueError, TypeError):
            return None


def label_offset(device_bytes: int) -> int:
    if device_bytes < 2 * LABEL_AREA_BYTES:
        raise InvalidSpec(f"a namespace of {device_bytes} bytes is too small for a volume and "
                          "its label")
    return device_bytes - LABEL_AREA_BYTES


def usable_bytes(device_bytes: int) -> int:
    """What a volume may use of a namespace of device_bytes."""
    return label_offset(device_bytes)


def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants


def read_block(device: str, offset: int, size: int = LABEL_BYTES) -> bytes:
    buf = _aligned(size)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def write_block(device: str, offset: int, data: bytes) -> None:
    buf = _aligned(len(data))
    buf.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        n = os.pwritev(fd, [buf], offset)
        if n != len(data):
            raise OSError(f"short write of the label to {device}: {n} of {len(data)} bytes")
        os.fsync(fd)  # through the drive's volatile write cache too
    finally:
        os.close(fd)
        buf.close()


def read(device: str, device_bytes: int) -> Label | None:
    return Label.decode(read_block(device, label_offset(device_bytes)))


def write(device: str, device_bytes: int, label: Label) -> None:
    write_block(device, label_offset(device_bytes), label.encode())


def label_area_is_blank(device: str, device_bytes: int) -> bool:
    """Whether the label area holds nothing but zeroes (never used by Tandem, or wiped)."""
    return not any(read_block(device, label_offset(device_bytes), LABEL_AREA_BYTES))
