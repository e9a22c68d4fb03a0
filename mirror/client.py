"""Blocking replica client: control plane, tests, checkers and the frontend's
connect/handshake/OPEN step (done off the data-path loop, then handed to it)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
from collections.abc import Iterable

from engine.errors import EngineError, Unavailable

from . import auth, wire
from .spec import ReplicaAddr


class ReplicaError(OSError, EngineError):
    """A replica answered a request with an error status (errno in .errno); its meaning in
    domain terms (and so its gRPC code) comes from engine.errors.ERRNO_ERRORS."""


class Fenced(ReplicaError):
    """A newer generation owns the volume: this frontend must stop (ESTALE)."""


def raise_status(status: int, what: str) -> None:
    if status == -errno.ESTALE:
        raise Fenced(errno.ESTALE, f"{what}: fenced by a newer generation")
    if status < 0:
        raise ReplicaError(-status, f"{what}: {os.strerror(-status)}")


def connect(
    addr: ReplicaAddr | tuple[str, int], key: bytes, timeout_s: float = 5.0
) -> socket.socket:
    host, port = (addr.host, addr.port) if isinstance(addr, ReplicaAddr) else addr
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise Unavailable(f"replica {host}:{port}: {e}") from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth.client_handshake(sock, key)
    except (OSError, Unavailable):
        sock.close()
        raise
    return sock


class ReplicaClient:
    def __init__(self, addr: ReplicaAddr | tuple[str, int], key: bytes, timeout_s: float = 10.0):
        self.sock = connect(addr, key, timeout_s)
        self.sock.settimeout(timeout_s)
        self._ids = itertools.count(1)
        self.info: dict = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_reply(self) -> tuple[int, int, bytes]:
        length, status, rid = wire.REP.unpack(auth.recv_exact(self.sock, wire.REP_BYTES))
        payload = (
            auth.recv_exact(self.sock, length - wire.REP_BYTES) if length > wire.REP_BYTES else b""
        )
        return rid, status, payload

    def pipeline(self, reqs: Iterable[tuple[int, int, int, bytes, int]]) -> list[tuple[int, bytes]]:
        """Send (op, offset, count, payload, flags) requests in one send, then collect replies."""
        ids, out = [], bytearray()
        for op, off, cnt, payload, flags in reqs:
            rid = next(self._ids)
            ids.append(rid)
            out += wire.request(op, rid, off, cnt, payload, flags)
        self.sock.sendall(out)
        res = []
        for rid in ids:
            got, status, payload = self._recv_reply()
            if got != rid:
                raise ReplicaError(errno.EPROTO, f"reply {got} for request {rid}")
            res.append((status, payload))
        return res

    def call(
        self, op: int, offset: int = 0, count: int = 0, payload: bytes = b"", flags: int = 0
    ) -> bytes:
        ((status, data),) = self.pipeline([(op, offset, count, payload, flags)])
        raise_status(status, wire.OP_NAMES.get(op, str(op)))
        return data

    # --- convenience ---------------------------------------------------------------
    def open(self, volume_id: str, generation: int, size_bytes: int = 0, create: bool = False,
             writer: bool = False) -> dict:
        """writer=True: the frontend's data link; it fences the previous data link."""
        req = {"volume_id": volume_id, "generation": generation, "size_bytes": size_bytes,
               "create": create, "writer": writer}
        self.info = json.loads(self.call(wire.OPEN, payload=json.dumps(req).encode()))
        return self.info

    def write(self, offset: int, data: bytes) -> None:
        self.call(wire.WRITE, offset, len(data), data)

    def read(self, offset: int, count: int) -> bytes:
        return self.call(wire.READ, offset, count)

    def sync(self) -> None:
        self.call(wire.SYNC)

    def get_info(self) -> dict:
        return json.loads(self.call(wire.INFO))

    def maps(self) -> tuple[bytes, bytes]:
        """(dirty map, activity-log map), one byte per region / extent."""
        info = self.get_info()
        data = self.call(wire.GET_MAPS)
        regions = -(-info["size_bytes"] // info["region_bytes"])
        return data[:regions], data[regions:]

    def checksum(self, offset: int = 0, count: int | None = None) -> bytes:
        if count is None:
            count = self.get_info()["size_bytes"] - offset
        return self.call(wire.CHECKSUM, offset, count)

    def has_data(self) -> bool:
        """Whether anything was ever written to the open volume on this replica."""
        return self.call(wire.HAS_DATA) == b"\x01"

    def list_volumes(self) -> list[str]:
        return json.loads(self.call(wire.LIST))

    def delete_volume(self, volume_id: str) -> None:
        self.call(wire.DELETE, payload=json.dumps({"volume_id": volume_id}).encode())

    def grow_volume(self, volume_id: str, size_bytes: int) -> dict:
        """Grow a replica (open by a frontend or not); returns its info after."""
        req = {"volume_id": volume_id, "size_bytes": size_bytes}
        return json.loads(self.call(wire.GROW, payload=json.dumps(req).encode()))
