"""The replica wire protocol, version 1 (docs/mirror.md has the table).

Every message after the handshake is a fixed header plus a payload. Requests
carry a request id; a server answers the requests of one connection in the
order it received them, so a client can pipeline many and match replies with
a FIFO (the id is still checked).
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 1

# request: total length, op, flags, reserved, request id, offset, count
REQ = struct.Struct("<IBBHQQI4x")
# reply: total length, status (0 or -errno), request id
REP = struct.Struct("<IiQ")
REQ_BYTES = REQ.size  # 32
REP_BYTES = REP.size  # 16
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

# ops
OPEN = 1  # payload JSON {volume_id, generation, size_bytes, create}; must come first
WRITE = 2  # payload = data at offset
READ = 3  # count bytes at offset -> reply payload
SYNC = 4  # fdatasync data and maps, ordered after earlier requests
DISCARD = 5  # punch a hole [offset, offset+count)
WRITE_ZEROES = 6  # zero [offset, offset+count)
INFO = 7  # -> JSON {generation, size_bytes, region_bytes, dirty_regions, tracking, ...}
GET_MAPS = 8  # -> dirty map (1 byte per region) + activity log map (1 byte per extent)
AL_ADD = 9  # payload u32 extents: durable before any later request is applied
AL_REMOVE = 10  # payload u32 extents
DEGRADE = 11  # start dirty tracking; payload u32 regions to mark now; durable on reply
CLEAR_DIRTY = 12  # payload u32 regions; flag F_ALL clears all and stops tracking
CHECKSUM = 13  # -> 32-byte sha256 of [offset, offset+count)
PING = 14
DELETE = 15  # payload JSON {volume_id}; only before OPEN; refuses an open volume
LIST = 16  # -> JSON list of volume ids
HAS_DATA = 17  # -> one byte: 1 if anything was ever written (a data extent), else 0
GROW = 18  # payload JSON {volume_id, size_bytes}; only before OPEN; open or not (expansion)

# flags
F_SPARSE = 1  # READ: a range that is all hole comes back with an empty payload
F_ALL = 2  # CLEAR_DIRTY: everything, and stop tracking

OP_NAMES = {
    v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int) and 0 < v < 64
}

U32 = struct.Struct("<I")


def pack_u32s(values: list[int] | range) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def unpack_u32s(payload: bytes | memoryview) -> tuple[int, ...]:
    return struct.unpack(f"<{len(payload) // 4}I", payload)


def request(
    op: int, req_id: int, offset: int = 0, count: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    return REQ.pack(REQ_BYTES + len(payload), op, flags, 0, req_id, offset, count) + payload


def reply(req_id: int, status: int = 0, payload: bytes = b"") -> bytes:
    return REP.pack(REP_BYTES + len(payload), status, req_id) + payload
