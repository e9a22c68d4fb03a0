"""mirror/_fastpath.c on its own: socket pairs stand in for /dev/fuse (SEQPACKET keeps
request boundaries, like the device) and for the replica connections. No root needed."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

import pytest

from mirror import _fastpath, wire
from mirror import fuse_proto as F

SIZE = 64 << 20
REGION = 64 << 10
EXTENT = 4 << 20


def fuse_write(unique: int, off: int, data: bytes, size: int | None = None) -> bytes:
    size = len(data) if size is None else size
    return (
        F.IN_HEADER.pack(80 + len(data), F.WRITE, unique, F.FILE_ID, 0, 0, 0, 0, 0)
        + F.RW_IN.pack(1, off, size, 0, 0, 0, 0)
        + data
    )


def fuse_read(unique: int, off: int, size: int) -> bytes:
    return F.IN_HEADER.pack(80, F.READ, unique, F.FILE_ID, 0, 0, 0, 0, 0) + F.RW_IN.pack(
        1, off, size, 0, 0, 0, 0
    )


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return out


class Rig:
    """A DataPath with a fake FUSE device and `links` fake replicas."""

    def __init__(self, links: int = 2, reply_cb: bool = False):
        self.ep = select.epoll()
        self.kernel, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dev.setblocking(False)
        self.kernel.settimeout(2)
        self.dev = dev
        self.slow: list[bytes] = []
        self.replies: list[tuple[int, int, object]] = []
        self.py_replies: list[tuple[int, object, int, bytes]] = []
        self.errors: list[tuple[int, int, str]] = []
        self.detached: list[tuple] = []
        self.detach_mode = _fastpath.DETACH_ACK
        self.raise_in_slow = False
        self.dp = _fastpath.DataPath(
            SIZE,
            self.ep.fileno(),
            self._reply if reply_cb else None,
            self._on_reply,
            self._on_error,
            REGION,
            EXTENT,
            -1 if reply_cb else dev.fileno(),
        )
        self.buf = bytearray((1 << 20) + 8192)
        self.dp.set_fuse(dev.fileno(), self.buf, self._slow)
        self.near: list[socket.socket] = []
        self.far: list[socket.socket] = []
        for slot in range(links):
            a, b = socket.socketpair()
            a.setblocking(False)
            b.settimeout(2)
            self.dp.attach(slot, a.fileno())
            self.near.append(a)
            self.far.append(b)

    def _slow(self, n: int) -> None:
        self.slow.append(bytes(self.buf[:n]))
        if self.raise_in_slow:
            raise RuntimeError("slow path failed (test)")

    def _reply(self, unique: int, err: int, payload: object) -> None:
        self.replies.append((unique, err, payload))

    def _on_reply(self, slot: int, op: object, status: int, payload: memoryview) -> None:
        self.py_replies.append((slot, op, status, bytes(payload)))

    def _on_error(self, slot: int, status: int, why: str) -> None:
        self.errors.append((slot, status, why))
        self.detached.append(self.dp.detach(slot, self.detach_mode))

    def ready(self, writes: int = 2) -> Rig:
        """Plain writes to every link, reads from link 0, extent 0 in the activity log."""
        self.dp.set_links(list(range(len(self.near)))[:writes], 0, [])
        self.dp.al_add([0])
        self.dp.fast = True
        return self

    def pump(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.dp.poll(10)

    def request(self, far: socket.socket) -> tuple[tuple, bytes]:
        hdr = wire.REQ.unpack(recv_exact(far, wire.REQ_BYTES))
        return hdr, recv_exact(far, hdr[0] - wire.REQ_BYTES)

    def fuse_reply(self) -> tuple[tuple, bytes]:
        msg = self.kernel.recv(1 << 21)
        return F.OUT_HEADER.unpack_from(msg), msg[16:]

    def no_fuse_reply(self) -> bool:
        self.kernel.setblocking(False)
        try:
            self.kernel.recv(1 << 21)
        except BlockingIOError:
            return True
        finally:
            self.kernel.settimeout(2)
        return False


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kw) -> Rig:
        r = Rig(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        for s in r.near + r.far + [r.kernel, r.dev]:
            s.close()
        r.ep.close()


def test_constants_match_the_wire_module():
    assert _fastpath.REQ_BYTES == wire.REQ_BYTES
    assert _fastpath.REP_BYTES == wire.REP_BYTES
    assert _fastpath.MAX_PAYLOAD_BYTES == wire.MAX_PAYLOAD_BYTES


def test_fast_write_fans_out_and_completes_after_every_ack(rig):
    r = rig().ready()
    data = os.urandom(4096)
    r.kernel.send(fuse_write(7, 8192, data))
    r.pump()
    rids = []
    for far in r.far:
        (length, op, flags, _, rid, off, cnt), payload = r.request(far)
        assert (length, op, flags, off, cnt, payload) == (
            32 + 4096,
            wire.WRITE,
            0,
            8192,
            4096,
            data,
        )
        rids.append(rid)
    assert rids[0] == rids[1]
    r.far[0].sendall(wire.reply(rids[0]))
    r.pump()
    assert r.no_fuse_reply(), "answered before every replica acked"
    r.far[1].sendall(wire.reply(rids[1]))
    r.pump()
    (length, err, unique), rest = r.fuse_reply()
    assert (length, err, unique, F.WRITE_OUT.unpack(rest)) == (24, 0, 7, (4096, 0))
    assert r.dp.inflight == 0 and r.dp.stats()["fast_writes"] == 1 and not r.slow


def test_poll_with_a_spin_window_serves_a_whole_write_in_one_call(rig):
    """FUSE request, fan-out and both acks arrive while one poll(timeout, spin) runs: it
    keeps handling them in C (no Python needed) and answers FUSE before it returns."""
    r = rig().ready()
    data = os.urandom(4096)

    def replicas() -> None:
        time.sleep(0.05)  # poll is waiting by now
        r.kernel.send(fuse_write(9, 4096, data))
        for far in r.far:
            (_, _, _, _, rid, _, _), _payload = r.request(far)
            far.sendall(wire.reply(rid))

    t = threading.Thread(target=replicas)
    t.start()
    polls = r.dp.stats()["polls"]
    assert r.dp.poll(2000, 1000) == []
    t.join()
    (length, err, unique), rest = r.fuse_reply()
    assert (length, err, unique, F.WRITE_OUT.unpack(rest)) == (24, 0, 9, (4096, 0))
    assert r.dp.stats()["polls"] - polls >= 3  # FUSE, then each ack, in the one call


def test_poll_spin_ends_at_a_python_callback_or_another_fd(rig):
    r = rig().ready()
    r.dp.fast = False  # every FUSE request goes to the slow path (a Python callback)
    req = fuse_write(1, 0, b"x" * 4096)
    r.kernel.send(req)
    t0 = time.monotonic()
    assert r.dp.poll(2000, 1000) == []
    assert r.slow == [req] and time.monotonic() - t0 < 0.5
    other_r, other_w = socket.socketpair()
    try:
        r.ep.register(other_r.fileno(), select.EPOLLIN)
        other_w.send(b"!")
        t0 = time.monotonic()
        assert r.dp.poll(2000, 1000) == [(other_r.fileno(), select.EPOLLIN)]
        assert time.monotonic() - t0 < 0.5
    finally:
        r.ep.unregister(other_r.fileno())
        other_r.close()
        other_w.close()


def test_poll_without_spin_returns_after_one_round(rig):
    r = rig().ready()
    r.kernel.send(fuse_write(3, 0, b"y" * 4096))
    t0 = time.monotonic()
    assert r.dp.poll(2000) == []
    assert time.monotonic() - t0 < 0.5 and r.dp.inflight == 1


@pytest.mark.parametrize(
    "case", ["not fast", "cold extent", "overlap", "past the end", "empty", "other op"]
)
def test_requests_c_may_not_take_go_to_python(rig, case):
    r = rig().ready()
    req = fuse_write(1, 0, b"x" * 4096)
    if case == "not fast":
        r.dp.fast = False
    elif case == "cold extent":
        req = fuse_write(1, EXTENT, b"x" * 4096)
    elif case == "overlap":
        r.dp.register(2048, 4096)
    elif case == "past the end":
        req = fuse_write(1, SIZE - 2048, b"x" * 4096)
    elif case == "empty":
        req = fuse_write(1, 0, b"")
    else:
        req = F.IN_HEADER.pack(40, F.FSYNC, 1, F.FILE_ID, 0, 0, 0, 0, 0)
    r.kernel.send(req)
    r.pump()
    assert r.slow == [req]
    assert r.dp.inflight == 0
    r.far[0].setblocking(False)
    with pytest.raises(BlockingIOError):
        r.far[0].recv(1)


def test_malformed_fuse_requests_are_refused_or_ignored(rig):
    r = rig().ready()
    r.kernel.send(fuse_write(3, 0, b"y" * 100, size=4096))  # says 4096, carries 100
    r.pump()
    assert r.fuse_reply()[0] == (16, -errno.EINVAL, 3)
    r.kernel.send(
        F.IN_HEADER.pack(60, F.WRITE, 4, F.FILE_ID, 0, 0, 0, 0, 0) + bytes(20)
    )  # no write_in
    r.pump()
    assert r.fuse_reply()[0] == (16, -errno.EINVAL, 4)
    r.kernel.send(b"\x01" * 12)  # not even a header
    r.pump()
    assert r.no_fuse_reply() and not r.slow and r.dp.inflight == 0


def test_replies_split_and_coalesced(rig):
    r = rig(links=1).ready(writes=1)
    for i in range(3):
        r.kernel.send(fuse_write(10 + i, i * 4096, bytes([i]) * 4096))
    r.pump()
    rids = [r.request(r.far[0])[0][4] for _ in range(3)]
    first = wire.reply(rids[0])
    for b in first:  # one byte at a time
        r.far[0].sendall(bytes([b]))
        r.pump(1)
    assert r.fuse_reply()[0] == (24, 0, 10)
    r.far[0].sendall(wire.reply(rids[1]) + wire.reply(rids[2]))  # two in one segment
    r.pump()
    assert [r.fuse_reply()[0][2] for _ in range(2)] == [11, 12]


def test_reply_for_another_request_is_a_link_error(rig):
    r = rig().ready()
    r.kernel.send(fuse_write(5, 0, b"z" * 4096))
    r.pump()
    rid = r.request(r.far[0])[0][4]
    r.far[0].sendall(wire.reply(rid + 100))
    r.pump()
    assert r.errors == [(0, 0, f"reply {rid + 100} for request {rid}")]
    pyops, regions, reads = r.detached[0]
    assert (pyops, regions, reads) == ([], [(0, 0)], [])
    assert r.no_fuse_reply()  # the survivor still has to ack (ACK mode counted this link as done)
    r.far[1].sendall(wire.reply(r.request(r.far[1])[0][4]))
    r.pump()
    assert r.fuse_reply()[0] == (24, 0, 5)


def test_error_status_stays_pending_for_the_failure_path(rig):
    r = rig().ready()
    r.detach_mode = _fastpath.DETACH_FAIL
    r.kernel.send(fuse_write(6, 65536 * 3, b"q" * 4096))
    r.pump()
    rid = r.request(r.far[0])[0][4]
    r.far[0].sendall(wire.reply(rid, -errno.ENOSPC))
    r.pump()
    assert r.errors == [(0, -errno.ENOSPC, "WRITE")]
    assert r.detached[0][1] == [(3, 3)]  # the failed write is handed over, not lost
    assert r.fuse_reply()[0] == (16, -errno.EIO, 6)  # FAIL mode: EIO at once
    r.far[1].sendall(wire.reply(r.request(r.far[1])[0][4]))  # a late ack changes nothing
    r.pump()
    assert r.no_fuse_reply() and r.dp.inflight == 0 and r.dp.stats()["busy"] == 0


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"\x08\0\0\0" + bytes(12), "bad reply length"),
        (wire.reply(1), "reply without request"),
        (None, "connection closed"),
    ],
)
def test_broken_replies(rig, bad, why):
    r = rig(links=1).ready(writes=1)
    if bad is None:
        r.far[0].close()
    else:
        r.far[0].sendall(bad)
    r.pump()
    assert r.errors == [(0, 0, why)]


def test_hold_release_and_fail(rig):
    r = rig(links=1).ready(writes=1)
    r.dp.hold = True
    for i in range(2):
        r.kernel.send(fuse_write(20 + i, i * 4096, b"h" * 4096))
    r.pump()
    for _ in range(2):
        r.far[0].sendall(wire.reply(r.request(r.far[0])[0][4]))
    r.pump()
    assert r.no_fuse_reply() and r.dp.held == 2
    r.dp.hold = False
    assert r.dp.release_held() == 2
    assert [r.fuse_reply()[0] for _ in range(2)] == [(24, 0, 20), (24, 0, 21)]
    r.dp.hold = True
    r.kernel.send(fuse_write(30, 0, b"i" * 4096))
    r.kernel.send(fuse_write(31, 8192, b"j" * 4096))
    r.pump()
    r.far[0].sendall(wire.reply(r.request(r.far[0])[0][4]))  # 30 done and held, 31 in flight
    r.pump()
    assert r.dp.fail_writes(errno.EIO) == 2
    assert sorted(r.fuse_reply()[0] for _ in range(2)) == [
        (16, -errno.EIO, 30),
        (16, -errno.EIO, 31),
    ]


def test_fast_reads_and_a_refused_read(rig):
    r = rig().ready()
    r.kernel.send(fuse_read(40, SIZE - 4096, 65536))  # clipped to the end of the volume
    r.pump()
    (length, op, flags, _, rid, off, cnt), _ = r.request(r.far[0])
    assert (op, flags, off, cnt) == (wire.READ, 0, SIZE - 4096, 4096)
    r.far[0].sendall(wire.reply(rid, 0, b"r" * 4096))
    r.pump()
    hdr, data = r.fuse_reply()
    assert hdr == (16 + 4096, 0, 40) and data == b"r" * 4096
    r.kernel.send(fuse_read(41, 0, 4096))
    r.pump()
    rid = r.request(r.far[0])[0][4]
    r.far[0].sendall(wire.reply(rid, -errno.EINVAL))
    r.pump()
    assert r.fuse_reply()[0] == (16, -errno.EINVAL, 41) and not r.errors


def test_python_ops_and_payload_views(rig):
    r = rig().ready()
    op = object()
    rid = r.dp.send(1, op, wire.INFO, 0, 5, 6, b"abc")
    r.dp.flush()  # queued until the batch is sent
    (length, wop, flags, _, got, off, cnt), payload = r.request(r.far[1])
    assert (length, wop, got, off, cnt, payload) == (35, wire.INFO, rid, 5, 6, b"abc")
    r.far[1].sendall(wire.reply(rid, 0, b"xyz"))
    r.pump()
    assert r.py_replies == [(1, op, 0, b"xyz")]
    assert r.dp.pending(1) == 0 and r.dp.oldest(1) is None
    r.dp.detach(1)
    assert r.dp.send(1, op, wire.PING) == 0  # detached: dropped, like a closed connection


def test_detach_returns_what_was_pending(rig):
    r = rig().ready()
    op = object()
    r.dp.send(0, op, wire.SYNC)
    r.kernel.send(fuse_read(50, 4096, 4096))
    r.kernel.send(fuse_write(51, 0, b"w" * 4096))
    r.pump()
    assert r.dp.pending(0) == 3 and r.dp.python_ops(0) == [op]
    pyops, regions, reads = r.dp.detach(0, _fastpath.DETACH_ACK)
    assert pyops == [op] and regions == [(0, 0)] and reads == [(50, 4096, 4096)]
    r.far[1].sendall(wire.reply(r.request(r.far[1])[0][4]))
    r.pump()
    assert r.fuse_reply()[0] == (24, 0, 51)
    assert r.dp.detach(0) == ([], [], [])  # idempotent


def test_an_exception_in_a_callback_surfaces_after_the_batch(rig):
    r = rig().ready()
    r.raise_in_slow = True
    r.kernel.send(F.IN_HEADER.pack(40, F.FSYNC, 60, F.FILE_ID, 0, 0, 0, 0, 0))
    r.kernel.send(fuse_write(61, 0, b"e" * 4096))
    with pytest.raises(RuntimeError, match="slow path failed"):
        for _ in range(5):
            r.dp.poll(10)
    assert r.dp.stats()["fast_writes"] == 1  # the request after it was still handled
    r.raise_in_slow = False
    r.pump()


def test_callback_replies_without_a_fuse_fd(rig):
    r = rig(links=1, reply_cb=True).ready(writes=1)
    r.dp.issue_write(70, wire.WRITE, 0, 4096, b"c" * 4096)
    r.dp.issue_write(71, wire.DISCARD, 65536, 65536, None)
    r.dp.flush()
    for _ in range(2):
        r.far[0].sendall(wire.reply(r.request(r.far[0])[0][4]))
    r.pump()
    assert r.replies == [(70, 0, 4096), (71, 0, None)]


def test_missing_maps_and_ranges(rig):
    r = rig(links=1)
    missing = bytearray(SIZE // REGION)
    r.dp.set_links([0], 0, [missing])
    r.dp.al_add([0])
    r.dp.issue_write(80, wire.WRITE, 3 * REGION + 100, 4096, b"m" * 4096)
    assert missing[3] == 1 and missing.count(1) == 1
    assert r.dp.conflicts(3 * REGION, 200) and not r.dp.conflicts(0, 4096)
    token = r.dp.register(0, 4096)
    assert r.dp.conflicts(0, 1) and r.dp.unregister(token) and not r.dp.unregister(token)


def test_activity_log_evicts_least_recently_used_cold_extents(rig):
    r = rig(links=1)
    r.dp.set_links([0], 0, [])
    r.dp.al_add([0, 1, 2, 3])
    r.dp.al_add([0])  # 0 is now the most recent
    r.dp.issue_write(1, wire.WRITE, 1 * EXTENT, 4096, b"a" * 4096)  # 1 is busy: never evicted
    assert r.dp.al_cold(0, 2 * EXTENT) == [] and r.dp.al_cold(5 * EXTENT, 4096) == [5]
    assert r.dp.al_evict(4, 2) == []  # not above the maximum
    assert r.dp.al_evict(3, 2) == [2, 3]
    assert r.dp.al_hot_extents() == [0, 1] and r.dp.al_is_hot(1)
    r.dp.al_clear()
    assert r.dp.al_hot_extents() == []


def test_argument_checks(rig):
    ep = select.epoll()
    cb = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError):
        _fastpath.DataPath(SIZE, ep.fileno(), None, cb, cb, 3000)  # not a power of two
    with pytest.raises(TypeError):
        _fastpath.DataPath(SIZE, ep.fileno(), None, 5, cb)
    ep.close()
    r = rig(links=1)
    with pytest.raises(ValueError):
        r.dp.set_links([1], -1, [])  # not attached
    with pytest.raises(ValueError):
        r.dp.set_links([0], -1, [bytearray(3)])  # map too short
    with pytest.raises(BufferError):
        r.dp.set_links([0], -1, [b"immutable" * 200])
    with pytest.raises(ValueError):
        r.dp.attach(0, r.near[0].fileno())  # attached already
    with pytest.raises(ValueError):
        r.dp.attach(99, 5)
    with pytest.raises(ValueError):
        r.dp.issue_write(1, wire.WRITE, SIZE, 4096, b"x" * 4096)
    with pytest.raises(ValueError):
        r.dp.issue_write(1, wire.WRITE, 0, 4096, b"short")
    with pytest.raises(ValueError):
        r.dp.issue_write(1, wire.READ, 0, 4096, None)
    with pytest.raises(ValueError):
        r.dp.issue_read(1, 0, 0)
    with pytest.raises(ValueError):
        r.dp.al_add([SIZE // EXTENT])
    with pytest.raises(ValueError):
        r.dp.set_fuse(r.dev.fileno(), bytearray(100), cb)
    assert r.dp.on_event(1234, select.EPOLLIN) is False  # not one of ours
    assert r.dp.issue_read(1, 0, 4096) is False  # no read replica


# ---------------------------------------------------------------- replica side


def req(
    op: int, rid: int, off: int = 0, count: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    return wire.request(op, rid, off, count, payload, flags)


def replies(out: bytearray) -> list[tuple[int, int, bytes]]:
    res, pos = [], 0
    while pos < len(out):
        length, status, rid = wire.REP.unpack_from(out, pos)
        res.append((rid, status, bytes(out[pos + 16 : pos + length])))
        pos += length
    return res


@pytest.fixture
def data_fd(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def test_replica_apply_writes_and_reads_then_stops_at_other_requests(data_fd):
    a, b = os.urandom(4096), os.urandom(512)
    msgs = [
        req(wire.WRITE, 1, 0, 4096, a),
        req(wire.WRITE, 2, 8192, 512, b),
        req(wire.READ, 3, 8192, 512),
        req(wire.SYNC, 4),
        req(wire.WRITE, 5, 0, 1, b"!"),
    ]
    buf = bytearray(b"".join(msgs))
    out = bytearray()
    pos = _fastpath.replica_apply(buf, 0, len(buf), data_fd, 1 << 20, out)
    assert pos == sum(len(m) for m in msgs[:3])  # stopped at SYNC: Python's
    assert replies(out) == [(1, 0, b""), (2, 0, b""), (3, 0, b)]
    assert os.pread(data_fd, 4096, 0) == a
    pos2 = _fastpath.replica_apply(buf, pos + len(msgs[3]), len(buf), data_fd, 1 << 20, out)
    assert pos2 == len(buf) and os.pread(data_fd, 1, 0) == b"!"


def test_replica_apply_partial_and_malformed_buffers(data_fd):
    w = req(wire.WRITE, 1, 0, 4096, bytes(4096))
    out = bytearray()
    buf = bytearray(w[:-1])  # one byte short
    assert _fastpath.replica_apply(buf, 0, len(buf), data_fd, 1 << 20, out) == 0 and out == b""
    buf = bytearray(w[:20])  # not even a header
    assert _fastpath.replica_apply(buf, 0, len(buf), data_fd, 1 << 20, out) == 0
    for length in (
        8,
        wire.REQ_BYTES + wire.MAX_PAYLOAD_BYTES + 1,
    ):  # left to Python, which refuses it
        bad = bytearray(wire.REQ.pack(length, wire.WRITE, 0, 0, 9, 0, 0) + bytes(64))
        assert _fastpath.replica_apply(bad, 0, len(bad), data_fd, 1 << 20, out) == 0
    sparse = bytearray(req(wire.READ, 2, 0, 4096, flags=wire.F_SPARSE))  # hole check: Python's
    assert _fastpath.replica_apply(sparse, 0, len(sparse), data_fd, 1 << 20, out) == 0
    with pytest.raises(ValueError):
        _fastpath.replica_apply(buf, 5, 2, data_fd, 1 << 20, out)
    with pytest.raises(ValueError):
        _fastpath.replica_apply(buf, 0, len(buf) + 1, data_fd, 1 << 20, out)


def test_replica_apply_error_replies(data_fd, tmp_path):
    msgs = [
        wire.REQ.pack(wire.REQ_BYTES + 10, wire.WRITE, 0, 0, 1, 0, 4096)
        + bytes(10),  # count != payload
        req(wire.WRITE, 2, (1 << 20) - 10, 20, bytes(20)),  # past the end
        req(wire.READ, 3, 1 << 20, 1),  # past the end
        req(wire.READ, 4, (1 << 20) - 4, 4),  # fine
    ]
    buf = bytearray(b"".join(msgs))
    out = bytearray()
    assert _fastpath.replica_apply(buf, 0, len(buf), data_fd, 1 << 20, out) == len(buf)
    assert [(rid, st) for rid, st, _ in replies(out)] == [
        (1, -errno.EINVAL),
        (2, -errno.EINVAL),
        (3, -errno.EINVAL),
        (4, 0),
    ]
    # a short file reads back as zeros up to the volume's size; a failing pwrite answers -errno
    ro = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        os.ftruncate(data_fd, 4096)
        buf = bytearray(req(wire.READ, 5, 0, 8192) + req(wire.WRITE, 6, 0, 4, b"abcd"))
        out = bytearray()
        assert _fastpath.replica_apply(buf, 0, len(buf), ro, 1 << 20, out) == len(buf)
        (r5, s5, d5), (r6, s6, _) = replies(out)
        assert (s5, len(d5), d5[4096:]) == (0, 8192, bytes(4096))
        assert (r6, s6) == (6, -errno.EBADF)
    finally:
        os.close(ro)


@pytest.mark.parametrize("what", ["write", "control"])
def test_a_positive_status_is_never_a_success(rig, what):
    """The protocol answers 0 or -errno; a reply with any other status is a broken link,
    not an acknowledgement (before: a write counted it as acked)."""
    r = rig(links=1).ready(writes=1)
    r.detach_mode = _fastpath.DETACH_FAIL
    if what == "write":
        r.kernel.send(fuse_write(50, 0, b"p" * 4096))
        r.pump()
    else:
        r.dp.send(0, object(), wire.DEGRADE)
        r.dp.flush()
    rid = r.request(r.far[0])[0][4]
    r.far[0].sendall(wire.reply(rid, 5))
    r.pump()
    assert r.errors == [(0, -errno.EPROTO, f"reply {rid} with status 5")]
    assert not r.py_replies
    if what == "write":
        assert r.fuse_reply()[0] == (16, -errno.EIO, 50)  # failed by the failure path


def test_a_read_answered_with_the_wrong_length_is_a_link_error(rig):
    """A short read reply would reach the application as data (before: it did)."""
    r = rig().ready()
    r.kernel.send(fuse_read(60, 0, 8192))
    r.pump()
    rid = r.request(r.far[0])[0][4]
    r.far[0].sendall(wire.reply(rid, 0, b"s" * 4096))
    r.pump()
    assert r.errors == [(0, -errno.EPROTO, "READ reply of 4096 bytes for 8192")]
    assert r.detached[0][2] == [(60, 0, 8192)]  # handed back to be read elsewhere
    assert r.no_fuse_reply()


def test_a_write_with_no_replica_to_go_to_fails(rig):
    """issue_write with an empty write set used to complete at once: acknowledged with no
    replica holding it."""
    r = rig(reply_cb=True)
    r.dp.set_links([], -1, [])
    r.dp.issue_write(70, wire.WRITE, 0, 4096, b"n" * 4096)
    assert r.replies == [(70, -errno.EIO, None)]
    assert r.dp.inflight == 0 and r.dp.stats()["busy"] == 0
