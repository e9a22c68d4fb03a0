"""Replica service + authenticated, pipelined client over loopback (no root needed)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time

import pytest

from mirror import auth, wire
from mirror.client import Fenced, ReplicaClient, ReplicaError
from mirror.replica_server import ReplicaService
from mirror.spec import REGION_BYTES

KEY = b"k" * 32
MiB = 1024 * 1024


@pytest.fixture
def svc(tmp_path):
    s = ReplicaService(str(tmp_path / "pool"), "127.0.0.1:0", KEY)
    s.start()
    yield s
    s.stop()


def client(svc, key=KEY):
    return ReplicaClient(("127.0.0.1", svc.port), key)


def test_write_read_sync_roundtrip(svc):
    with client(svc) as c:
        info = c.open("vol-a", 1, 16 * MiB, create=True)
        assert info["size_bytes"] == 16 * MiB and info["generation"] == 1
        data = os.urandom(8192)
        c.write(4096, data)
        c.sync()
        assert c.read(4096, 8192) == data
        assert c.read(0, 4096) == bytes(4096)


def test_open_is_idempotent_and_size_mismatch_refused(svc):
    with client(svc) as c:
        c.open("vol-a", 1, 16 * MiB, create=True)
    with client(svc) as c:
        assert c.open("vol-a", 1, 16 * MiB, create=True)["size_bytes"] == 16 * MiB
    with client(svc) as c, pytest.raises(ReplicaError) as ei:
        c.open("vol-a", 1, 32 * MiB, create=True)
    assert ei.value.errno == errno.EEXIST


def test_pipelined_writes_answer_in_order_with_ids(svc):
    with client(svc) as c:
        c.open("vol-p", 1, 16 * MiB, create=True)
        blocks = [os.urandom(4096) for _ in range(256)]
        res = c.pipeline((wire.WRITE, i * 4096, 4096, b, 0) for i, b in enumerate(blocks))
        assert [s for s, _ in res] == [0] * 256
        res = c.pipeline((wire.READ, i * 4096, 4096, b"", 0) for i in range(256))
        assert [p for _, p in res] == blocks


def test_wrong_key_gets_nothing(svc, tmp_path):
    with client(svc) as c:
        c.open("vol-s", 1, 16 * MiB, create=True)
        c.write(0, b"x" * 4096)
    with pytest.raises(auth.AuthFailed):
        client(svc, key=b"w" * 32)
    # a raw client that skips the handshake and sends a request gets only the nonce
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    hello = auth.recv_exact(s, auth.SERVER_HELLO.size)
    assert hello[:4] == b"TDMR"
    s.sendall(wire.request(wire.READ, 1, 0, 4096).ljust(auth.CLIENT_PROOF.size, b"\0"))
    assert s.recv(65536) == b""  # closed, nothing served
    s.close()
    with client(svc) as c:
        c.open("vol-s", 1)
        assert c.read(0, 4096) == b"x" * 4096


def test_requests_before_open_are_refused(svc):
    with client(svc) as c, pytest.raises(ReplicaError) as ei:
        c.write(0, b"x" * 4096)
    assert ei.value.errno == errno.EBADF


def test_generation_fences_old_frontend(svc):
    old = client(svc)
    old.open("vol-g", 1, 16 * MiB, create=True)
    old.write(0, b"a" * 4096)
    new = client(svc)
    new.open("vol-g", 2)
    with pytest.raises(Fenced):
        old.write(0, b"b" * 4096)
    with client(svc) as stale, pytest.raises(Fenced):
        stale.open("vol-g", 1)
    assert new.read(0, 4096) == b"a" * 4096
    old.close()
    new.close()


def test_dirty_tracking_is_durable_and_cleared(svc, tmp_path):
    with client(svc) as c:
        c.open("vol-d", 1, 16 * MiB, create=True)
        c.write(0, b"a" * 4096)  # not tracked yet
        c.call(wire.DEGRADE, payload=wire.pack_u32s([7]))
        c.write(3 * REGION_BYTES + 100, b"b" * 4096)
        c.pipeline([(wire.DISCARD, 10 * REGION_BYTES, 2 * REGION_BYTES, b"", 0)])
    svc.stop()
    svc2 = ReplicaService(svc.pool_dir, "127.0.0.1:0", KEY)
    svc2.start()
    try:
        with client(svc2) as c:
            c.open("vol-d", 1)
            dirty, _ = c.maps()
            assert [i for i, b in enumerate(dirty) if b] == [3, 7, 10, 11]
            assert c.get_info()["tracking"] is True
            c.call(wire.CLEAR_DIRTY, payload=wire.pack_u32s([3]))
            c.sync()
            assert [i for i, b in enumerate(c.maps()[0]) if b] == [7, 10, 11]
            c.call(wire.CLEAR_DIRTY, flags=wire.F_ALL)
            assert c.get_info()["tracking"] is False and not any(c.maps()[0])
    finally:
        svc2.stop()


def test_activity_log_survives_restart(svc):
    with client(svc) as c:
        c.open("vol-al", 1, 64 * MiB, create=True)
        c.call(wire.AL_ADD, payload=wire.pack_u32s([1, 5]))
        c.call(wire.AL_REMOVE, payload=wire.pack_u32s([1]))
        c.sync()
    svc.stop()
    svc2 = ReplicaService(svc.pool_dir, "127.0.0.1:0", KEY)
    svc2.start()
    try:
        with client(svc2) as c:
            c.open("vol-al", 1)
            assert [i for i, b in enumerate(c.maps()[1]) if b] == [5]
    finally:
        svc2.stop()


def test_sparse_read_checksum_list_delete(svc):
    with client(svc) as c:
        c.open("vol-x", 1, 16 * MiB, create=True)
        c.write(MiB, b"z" * 4096)
        assert c.call(wire.READ, 4 * MiB, MiB, flags=wire.F_SPARSE) == b""
        assert len(c.call(wire.READ, MiB, MiB, flags=wire.F_SPARSE)) == MiB
        with client(svc) as c2:
            c2.open("vol-y", 1, 16 * MiB, create=True)
            c2.write(MiB, b"z" * 4096)
            assert c2.checksum() == c.checksum()
            assert c2.list_volumes() == ["vol-x", "vol-y"]
    with client(svc) as c:
        # the server lets go of vol-x when it has seen the first client close: until then
        # a delete is EBUSY (the volume is open), which a control plane retries
        deadline = time.monotonic() + 5
        while True:
            try:
                c.delete_volume("vol-x")
                break
            except ReplicaError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        assert c.list_volumes() == ["vol-y"]
        with pytest.raises(ReplicaError):
            c.delete_volume("../etc")


def test_out_of_range_and_bad_length(svc):
    with client(svc) as c:
        c.open("vol-r", 1, 16 * MiB, create=True)
        with pytest.raises(ReplicaError) as ei:
            c.write(16 * MiB - 2048, b"x" * 4096)
        assert ei.value.errno == errno.EINVAL
        # a header whose count disagrees with its payload is refused, the stream stays usable
        bad = (struct.pack("<IBBHQQI4x", wire.REQ_BYTES + 10, wire.WRITE, 0, 0, 99, 0, 4096)
               + b"y" * 10)
        c.sock.sendall(bad)
        rid, status, _ = c._recv_reply()
        assert (rid, status) == (99, -errno.EINVAL)
        c.ping = c.call(wire.PING)


def test_new_data_link_fences_the_previous_one(svc):
    """A socket the frontend gave up on must not apply writes that arrive late."""
    old = client(svc)
    old.open("vol-w", 1, 16 * MiB, create=True, writer=True)
    old.write(0, b"a" * 4096)
    new = client(svc)
    new.open("vol-w", 1, writer=True)  # same generation: the same frontend reconnecting
    with pytest.raises(Fenced):
        old.write(0, b"b" * 4096)
    with client(svc) as checker:  # a non-writer connection is not a data link and is not fenced
        checker.open("vol-w", 1)
        assert checker.read(0, 4096) == b"a" * 4096
    new.write(0, b"c" * 4096)
    assert new.read(0, 4096) == b"c" * 4096
    old.close()
    new.close()


def test_a_newer_open_waits_for_a_batch_that_passed_its_check(svc):
    """An old frontend's write passed its generation check, then (the test hook widens
    the window) is applied late. The newer frontend's OPEN returns only after it landed,
    so it can never overwrite the newer frontend's data (before: it did)."""
    old = client(svc)
    old.open("vol-r", 1, 16 * MiB, create=True, writer=True)
    svc.test_apply_delay_s = 0.5
    old.sock.sendall(wire.request(wire.WRITE, 99, 0, 4096, b"o" * 4096))
    time.sleep(0.1)
    svc.test_apply_delay_s = 0.0  # only the old batch is slow
    with client(svc) as new:
        new.open("vol-r", 2, writer=True)
        new.write(0, b"n" * 4096)
        time.sleep(0.6)
        assert new.read(0, 4096) == b"n" * 4096
    old.close()


def test_handshakes_cost_no_threads_are_capped_and_time_out(tmp_path):
    s = ReplicaService(str(tmp_path / "pool"), "127.0.0.1:0", KEY, max_handshakes=6,
                       max_handshakes_per_source=3, handshake_timeout_s=0.5)
    s.start()
    silent: list[socket.socket] = []
    try:
        threads = threading.active_count()
        for _ in range(20):
            try:
                silent.append(socket.create_connection(("127.0.0.1", s.port), timeout=2))
            except OSError:  # reset over the cap before connect() even returned
                pass
        time.sleep(0.2)
        assert threading.active_count() == threads  # the handshakes run on one thread
        greeted = 0
        for c in silent:  # three got the server's hello, the others a reset
            try:
                greeted += len(auth.recv_exact(c, auth.SERVER_HELLO.size)) > 0
            except (OSError, auth.AuthFailed):
                pass
        assert greeted == 3
        # another address is not starved by the first one's flood
        other = socket.create_connection(("127.0.0.1", s.port), timeout=2,
                                         source_address=("127.0.0.2", 0))
        auth.client_handshake(other, KEY)
        other.close()
        time.sleep(0.7)  # past the deadline: the silent ones are gone
        assert s.acceptor is not None and s.acceptor.pending == 0
        with client(s) as c:  # and the service still serves
            c.open("vol-h", 1, 16 * MiB, create=True)
    finally:
        for c in silent:
            c.close()
        s.stop()
