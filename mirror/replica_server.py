"""The replica service: holds replicas in the node's pool and serves them over TCP.

The key handshake of every new connection runs on one thread (mirror/acceptor.py:
caps per source and overall, a deadline, accept() errors survived), so a flood of
unauthenticated connections costs no threads. Each authenticated connection gets a
thread (a frontend keeps one connection per volume), which takes everything the
socket has, applies the whole batch in order, and answers it with one send. Plain
writes and reads are applied by the C fast path (_fastpath.replica_apply:
pwrite/pread, no GIL); every other request, and any request while the connection
is not cleared for it, comes here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time

from engine.errors import AlreadyExists, EngineError, InvalidSpec, NotFound

from . import _fastpath, wire
from .acceptor import Acceptor
from .replica_store import ReplicaVolume, check_volume_id
from .spec import REGION_BYTES

log = logging.getLogger(__name__)

RECV_BUFFER_BYTES = 4 * 1024 * 1024
WRITE_OPS = (wire.WRITE, wire.DISCARD, wire.WRITE_ZEROES)


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, AlreadyExists):
        return errno.EEXIST
    if isinstance(exc, InvalidSpec):
        return errno.EINVAL
    return errno.EIO


class ProtocolError(Exception):
    pass


class ReplicaService:
    """Serve the replicas under pool_dir on listen_addr ("host:port"; port 0 picks one)."""

    def __init__(self, pool_dir: str, listen_addr: str, key: bytes, max_handshakes: int = 512,
                 max_handshakes_per_source: int = 64, handshake_timeout_s: float = 5.0):
        """max_handshakes*: unauthenticated connections at a time, overall and per address
        (also bounded by the descriptor limit, see Acceptor)."""
        self.pool_dir = pool_dir
        host, _, port = listen_addr.rpartition(":")
        self._bind = (host or "0.0.0.0", int(port))
        self._key = key
        self._caps = (max_handshakes, max_handshakes_per_source, handshake_timeout_s)
        self._vols: dict[str, list] = {}  # volume id -> [ReplicaVolume, open connections]
        self._vols_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.acceptor: Acceptor | None = None
        self._stopping = False
        self._port = self._bind[1]
        self.test_delay_s = 0.0  # test hook: a slow replica (this kernel has no netem)
        # test hook: a pause between a batch's generation check and its application, the
        # window in which a newer frontend's OPEN must wait for the batch (see OPEN)
        self.test_apply_delay_s = 0.0

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.pool_dir, exist_ok=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self._bind)
        s.listen(128)
        self._port = s.getsockname()[1]
        mx, per, timeout = self._caps
        self.acceptor = Acceptor(s, self._key, self._on_peer, mx, per, timeout)
        self.acceptor.start()

    @property
    def port(self) -> int:
        return self._port

    def stop(self) -> None:
        self._stopping = True
        if self.acceptor is not None:
            self.acceptor.stop()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _on_peer(self, sock: socket.socket, source: str) -> None:
        """An authenticated connection (from the acceptor's thread)."""
        if self._stopping:
            sock.close()
            return
        self._conns.add(sock)
        threading.Thread(target=self._serve, args=(sock,), name="replica-conn",
                         daemon=True).start()

    # --- volumes -------------------------------------------------------------
    def _acquire(self, volume_id: str, size_bytes: int, create: bool) -> ReplicaVolume:
        with self._vols_lock:
            ent = self._vols.get(volume_id)
            if ent is None:
                try:
                    vol = ReplicaVolume.open(self.pool_dir, volume_id)
                except NotFound:
                    if not create:
                        raise
                    vol = ReplicaVolume.create(self.pool_dir, volume_id, size_bytes)
                ent = self._vols[volume_id] = [vol, 0]
            vol = ent[0]
            # larger is fine: the control plane grows every replica before their frontend
            # (an online expansion), which may reconnect meanwhile at its old size
            if size_bytes and vol.size_bytes < size_bytes:
                if ent[1] == 0:
                    del self._vols[volume_id]
                    vol.close()
                raise AlreadyExists(f"{volume_id} has {vol.size_bytes} bytes, not {size_bytes}")
            ent[1] += 1
            return vol

    def _release(self, vol: ReplicaVolume) -> None:
        with self._vols_lock:
            ent = self._vols[vol.volume_id]
            ent[1] -= 1
            if ent[1] == 0:
                del self._vols[vol.volume_id]
                vol.close()

    def _delete(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self._vols_lock:
            if volume_id in self._vols:
                raise OSError(errno.EBUSY, f"{volume_id} is open")
            ReplicaVolume.delete(self.pool_dir, volume_id)

    def _grow(self, volume_id: str, size_bytes: int) -> dict:
        """Grow a replica whether a frontend has it open or not (under the same lock as
        opening it, so nothing opens it half grown)."""
        check_volume_id(volume_id)
        with self._vols_lock:
            ent = self._vols.get(volume_id)
            if ent is not None:
                ent[0].grow(size_bytes)
                return ent[0].info()
            vol = ReplicaVolume.open(self.pool_dir, volume_id)
            try:
                vol.grow(size_bytes)
                return vol.info()
            finally:
                vol.close()

    def _list(self) -> list[str]:
        try:
            names = os.listdir(self.pool_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n for n in names if os.path.exists(os.path.join(self.pool_dir, n, "meta.json"))
        )

    # --- connections -----------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(self, sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            conn.run()
        except (OSError, ProtocolError) as e:
            if not self._stopping:
                log.info("connection ended: %s", e)
        finally:
            self._conns.discard(sock)
            if conn.vol is not None:
                self._release(conn.vol)
            sock.close()


class _Conn:
    def __init__(self, svc: ReplicaService, sock: socket.socket):
        self.svc = svc
        self.sock = sock
        self.vol: ReplicaVolume | None = None
        self.generation = -1
        self.writer = False
        self.writer_epoch = -1  # for writer connections: fenced when a newer writer opens

    def run(self) -> None:
        buf = bytearray(RECV_BUFFER_BYTES)
        fill = 0
        unpack = wire.REQ.unpack_from
        apply_fast = _fastpath.replica_apply
        while True:
            with memoryview(buf) as mv:
                n = self.sock.recv_into(mv[fill:])
            if n == 0:
                return
            fill += n
            out = bytearray()
            pos = 0
            premarked = False
            batch_vol = self.vol  # counted while applying: a newer OPEN waits for this batch
            if batch_vol is not None:
                batch_vol.begin_batch()
            try:
                vol = self.vol
                if vol is not None and vol.tracking:
                    # dirty bits for the whole batch in one durable update, before data lands
                    premarked = self._premark(vol, buf, fill)
                while True:
                    vol = self.vol
                    if (
                        vol is not None
                        and vol.generation == self.generation
                        and self.writer_epoch == vol.writer_epoch
                        and (premarked or not vol.tracking)
                    ):
                        if self.svc.test_apply_delay_s:
                            time.sleep(self.svc.test_apply_delay_s)
                        pos = apply_fast(buf, pos, fill, vol.fd, vol.size_bytes, out)  # hot path
                    if fill - pos < wire.REQ_BYTES:
                        break
                    length, op, flags, _, rid, off, cnt = unpack(buf, pos)
                    if (length < wire.REQ_BYTES
                            or length > wire.REQ_BYTES + wire.MAX_PAYLOAD_BYTES):
                        raise ProtocolError(f"bad length {length}")
                    if fill - pos < length:
                        break
                    with memoryview(buf) as mv:
                        out += self._apply_one(
                            op, flags, rid, off, cnt, mv[pos + wire.REQ_BYTES : pos + length],
                            premarked,
                        )
                    pos += length
            finally:
                if batch_vol is not None:
                    batch_vol.end_batch()
            if out:
                if self.svc.test_delay_s:
                    time.sleep(self.svc.test_delay_s)
                self.sock.sendall(out)
            if pos:
                buf[: fill - pos] = buf[pos:fill]
                fill -= pos
            if fill == len(buf):  # one message larger than the buffer: grow once
                buf.extend(bytes(len(buf)))

    @staticmethod
    def _premark(vol: ReplicaVolume, buf: bytearray, fill: int) -> bool:
        regions: set[int] = set()
        pos = 0
        while fill - pos >= wire.REQ_BYTES:
            length, op, _, _, _, off, cnt = wire.REQ.unpack_from(buf, pos)
            if length < wire.REQ_BYTES or fill - pos < length:
                break
            if op in WRITE_OPS and cnt and off >= 0 and off + cnt <= vol.size_bytes:
                regions.update(range(off // REGION_BYTES, (off + cnt - 1) // REGION_BYTES + 1))
            pos += length
        if regions:
            vol.mark_dirty(regions)
        return True

    def _apply_one(
        self,
        op: int,
        flags: int,
        rid: int,
        off: int,
        cnt: int,
        payload: memoryview,
        premarked: bool,
    ) -> bytes:
        rep = wire.REP.pack
        try:
            data = self._slow_op(op, flags, off, cnt, payload, premarked)
            return rep(wire.REP_BYTES + len(data), 0, rid) + data
        except ProtocolError:
            raise
        except (OSError, EngineError, ValueError, KeyError, TypeError) as exc:
            return rep(wire.REP_BYTES, -_errno_of(exc), rid)
        except Exception:  # a bug must not kill the connection silently
            log.exception("op %s failed", op)
            return rep(wire.REP_BYTES, -errno.EIO, rid)

    def _slow_op(
        self, op: int, flags: int, off: int, cnt: int, payload: memoryview, premarked: bool
    ) -> bytes:
        svc = self.svc
        vol: ReplicaVolume | None
        if op == wire.OPEN:
            if self.vol is not None:
                raise InvalidSpec("already open")
            req = json.loads(bytes(payload))
            vol = svc._acquire(
                req["volume_id"], int(req.get("size_bytes", 0)), bool(req.get("create"))
            )
            gen = int(req["generation"])
            if gen < vol.generation:
                svc._release(vol)
                raise OSError(errno.ESTALE, f"generation {gen} < {vol.generation}: fenced")
            vol.raise_generation(gen)  # fences every connection of an older frontend
            self.vol, self.generation = vol, gen
            self.writer = bool(req.get("writer"))
            if self.writer:
                # a frontend's data link: an older one (say a socket the frontend gave up on
                # during a partition, whose queued writes arrive after the heal) is fenced
                with vol.lock:
                    vol.writer_epoch += 1
                    self.writer_epoch = vol.writer_epoch
            else:
                self.writer_epoch = vol.writer_epoch
            # a batch of a fenced connection that passed its check just before is applied
            # before this OPEN returns: nothing of it can land after the new owner's writes
            # or after its reads of the maps
            if not vol.wait_for_batches():
                log.warning("%s: a batch of an older connection is still running", vol.volume_id)
            return json.dumps(vol.info()).encode()
        if op == wire.PING:
            return b""
        if op == wire.LIST:
            return json.dumps(svc._list()).encode()
        if op == wire.DELETE:
            svc._delete(json.loads(bytes(payload))["volume_id"])
            return b""
        if op == wire.GROW:
            if self.vol is not None:
                raise InvalidSpec("GROW is an administrative request, before any OPEN")
            req = json.loads(bytes(payload))
            return json.dumps(svc._grow(req["volume_id"], int(req["size_bytes"]))).encode()
        vol = self.vol
        if vol is None:
            raise OSError(errno.EBADF, "no volume open on this connection")
        if vol.generation != self.generation:
            raise OSError(errno.ESTALE, "a newer frontend opened this volume")
        if self.writer and self.writer_epoch != vol.writer_epoch:
            raise OSError(errno.ESTALE, "a newer data link opened this volume")
        if op == wire.READ:
            vol.check_range(off, cnt)
            if flags & wire.F_SPARSE and vol.is_hole(off, cnt):
                return b""
            data = os.pread(vol.fd, cnt, off)
            return data + bytes(cnt - len(data))
        if op in (wire.DISCARD, wire.WRITE_ZEROES, wire.WRITE):
            vol.check_range(off, cnt)
            if vol.tracking and not premarked:
                vol.mark_dirty_range(off, cnt)
            if op == wire.WRITE:
                if len(payload) != cnt:
                    raise InvalidSpec("write length mismatch")
                os.pwrite(vol.fd, payload, off)
            elif op == wire.DISCARD:
                vol.punch(off, cnt)
            else:
                vol.zero(off, cnt)
            return b""
        if op == wire.SYNC:
            vol.sync()
            return b""
        if op == wire.INFO:
            return json.dumps(vol.info()).encode()
        if op == wire.GET_MAPS:
            with vol.lock:
                return bytes(vol.dirty) + bytes(vol.al)
        if op == wire.AL_ADD:
            vol.al_add(wire.unpack_u32s(payload))
            return b""
        if op == wire.AL_REMOVE:
            vol.al_remove(wire.unpack_u32s(payload))
            return b""
        if op == wire.DEGRADE:
            vol.start_tracking()
            vol.mark_dirty(wire.unpack_u32s(payload))
            return b""
        if op == wire.CLEAR_DIRTY:
            vol.clear_dirty(None if flags & wire.F_ALL else wire.unpack_u32s(payload))
            return b""
        if op == wire.CHECKSUM:
            vol.check_range(off, cnt)
            return vol.checksum(off, cnt)
        if op == wire.HAS_DATA:  # the never-format-data rule, asked by a staging node
            return b"\x00" if vol.is_hole(0, vol.size_bytes) else b"\x01"
        raise OSError(errno.EOPNOTSUPP, f"op {op}")
