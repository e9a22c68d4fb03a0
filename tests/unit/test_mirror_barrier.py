"""MirrorCore's write barrier (consistent snapshots of every replica) and online growth,
driven directly against in-process replica services (no FUSE, no root)."""

from __future__ import annotations

import errno
import os

import pytest

from engine.errors import Busy, Unavailable
from mirror import wire
from mirror.arbiter import SqliteArbiter
from mirror.client import ReplicaClient
from mirror.replica_server import ReplicaService
from tests.unit.test_mirror_core import KEY, SIZE, FlakyArbiter, Harness


def peek(svc, offset: int, n: int, generation: int = 1) -> bytes:
    """What a replica holds, read beside a live frontend (at its generation: not fencing)."""
    with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
        c.open("vol", generation)
        return c.read(offset, n)


def digest(svc, generation: int = 1) -> bytes:
    with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
        c.open("vol", generation)
        return c.checksum()


@pytest.fixture
def env(tmp_path):
    svcs = [ReplicaService(str(tmp_path / f"pool{i}"), "127.0.0.1:0", KEY) for i in range(2)]
    for s in svcs:
        s.start()
    arb = FlakyArbiter(SqliteArbiter(str(tmp_path / "arb.db")))
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(tmp_path, svcs, arb, **kw)
        made.append(h)
        return h

    yield svcs, arb, make
    for h in made:
        h.core.close()
    for s in svcs:
        s.stop()


def held(h: Harness) -> bool:
    return h.core.barrier is not None and h.core.barrier.state == "held"


def test_a_barrier_holds_new_writes_and_flushes_until_it_is_resumed(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"a" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    got = h.core.barrier_begin("snap-1", 10.0)
    assert got["state"] in ("draining", "syncing") and got["generation"] == 1
    assert h.spin(lambda: held(h))
    assert sorted(h.core.barrier_begin("snap-1", 10.0)["replicas"]) == ["r1", "r2"]
    h.write(2, 0, b"b" * 4096)  # after the barrier: held back, not answered, not sent
    h.core.submit_sync(3)
    h.core.submit_read(4, 0, 4096)  # reads go on
    assert h.spin(lambda: 4 in h.replies)
    assert h.replies[4] == (0, b"a" * 4096)
    assert not h.spin(lambda: 2 in h.replies or 3 in h.replies, timeout_s=0.5)
    for s in svcs:  # what a snapshot of each replica now sees: the same, without write 2
        assert peek(s, 0, 4096) == b"a" * 4096
    assert digest(svcs[0]) == digest(svcs[1])
    with pytest.raises(Busy):  # one barrier at a time
        h.core.barrier_begin("snap-2", 10.0)
    assert h.core.barrier_end("snap-1") is True
    assert h.spin(lambda: {2, 3} <= h.replies.keys())
    assert h.replies[2] == (0, 4096) and h.replies[3] == (0, None)
    assert h.order.index(2) < h.order.index(3)
    assert peek(svcs[1], 0, 4096) == b"b" * 4096
    assert h.core.barrier_end("snap-1") is True  # asked again: the same answer
    assert h.core.dp.fast  # the C side takes plain writes alone again


def test_writes_in_flight_and_deferred_ones_drain_before_it_holds(env):
    svcs, arb, make = env
    h = make()
    svcs[1].test_delay_s = 0.3  # replies from r2 come late
    h.write(1, 0, b"1" * 8192)
    h.write(2, 4096, b"2" * 4096)  # overlaps 1: deferred, yet it came before the barrier
    assert h.core.deferred
    h.core.barrier_begin("snap-1", 10.0)
    h.write(3, 65536, b"3" * 4096)  # after it
    assert h.spin(lambda: held(h))
    assert {1, 2} <= h.replies.keys() and 3 not in h.replies
    svcs[1].test_delay_s = 0.0
    for s in svcs:
        assert peek(s, 0, 8192) == b"1" * 4096 + b"2" * 4096
        assert peek(s, 65536, 4096) == bytes(4096)
    assert h.core.barrier_end("snap-1") is True
    assert h.spin(lambda: 3 in h.replies)


def test_a_barrier_nobody_resumes_lets_go_by_itself(env):
    svcs, arb, make = env
    h = make()
    h.core.barrier_begin("snap-1", 0.5)
    assert h.spin(lambda: held(h))
    h.write(1, 0, b"x" * 4096)
    assert h.spin(lambda: 1 in h.replies, timeout_s=3)  # let go at its deadline
    assert h.replies[1] == (0, 4096) and h.core.barrier is None
    assert h.core.barrier_end("snap-1") is False  # the controller learns it did not hold
    with pytest.raises(Unavailable, match="already let go"):
        h.core.barrier_begin("snap-1", 10.0)
    assert h.core.barrier_end("never-raised") is False


def test_a_replica_lost_at_the_barrier_is_left_out_of_the_identical_set(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"x" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    svcs[1].stop()
    h.core.barrier_begin("snap-1", 10.0)
    assert h.spin(lambda: held(h))
    assert h.core.barrier.replicas == ["r1"]  # r2 was dropped (recorded out of sync)
    assert arb.get("vol").replicas["r2"] == "out_of_sync"
    assert h.core.barrier_end("snap-1") is True


def test_fencing_fails_what_the_barrier_held_back(env):
    svcs, arb, make = env
    h = make()
    h.core.barrier_begin("snap-1", 10.0)
    assert h.spin(lambda: held(h))
    h.write(1, 0, b"x" * 4096)
    h.core.self_fence("lease lost (test)")
    assert h.spin(lambda: 1 in h.replies)
    assert h.replies[1][0] == -errno.EIO
    assert h.core.barrier is None and h.core.barrier_end("snap-1") is False
    for s in svcs:
        assert peek(s, 0, 4096) == bytes(4096)


def test_growth_replicas_first_then_the_frontend(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"a" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    h.write(2, SIZE, b"b" * 4096)  # beyond the end: refused
    assert h.spin(lambda: 2 in h.replies) and h.replies[2][0] == -errno.EINVAL
    for s in svcs:  # the control plane grows every replica while the frontend is open
        with ReplicaClient(("127.0.0.1", s.port), KEY) as c:
            assert c.grow_volume("vol", 2 * SIZE)["size_bytes"] == 2 * SIZE
    h.write(3, 4096, b"c" * 4096)  # the frontend still serves its old size meanwhile
    assert h.spin(lambda: 3 in h.replies) and h.replies[3] == (0, 4096)
    h.core.grow(2 * SIZE)
    h.write(4, 2 * SIZE - 4096, b"d" * 4096)
    h.core.submit_sync(5)
    assert h.spin(lambda: 5 in h.replies)
    assert h.replies[4] == (0, 4096)
    for s in svcs:
        assert peek(s, 2 * SIZE - 4096, 4096) == b"d" * 4096


def test_a_replica_grown_ahead_of_its_frontend_reconnects_and_resyncs(env):
    """r2 goes away, is grown (the controller), comes back: the frontend still serves the
    old size, reads r2's longer maps right, and repairs it."""
    svcs, arb, make = env
    h = make()
    svcs[1].stop()
    h.write(1, 3 * 65536, b"x" * 4096)  # r2 misses it
    assert h.spin(lambda: 1 in h.replies)
    pool = svcs[1].pool_dir
    svcs[1] = ReplicaService(pool, f"127.0.0.1:{svcs[1].port}", KEY)
    with ReplicaClient(("127.0.0.1", svcs[0].port), KEY) as c:
        c.grow_volume("vol", 2 * SIZE)
    svcs[1].start()
    with ReplicaClient(("127.0.0.1", svcs[1].port), KEY) as c:
        c.grow_volume("vol", 2 * SIZE)
    assert h.spin(lambda: all(s.state.value == "in_sync" and s.connected
                              for s in h.core.status()), timeout_s=10)
    assert peek(svcs[1], 3 * 65536, 4096) == b"x" * 4096


def test_the_replica_store_grows_while_open_and_never_shrinks(tmp_path):
    svc = ReplicaService(str(tmp_path / "pool"), "127.0.0.1:0", KEY)
    svc.start()
    try:
        with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
            c.open("vol", 1, SIZE, create=True, writer=True)
            c.write(0, b"a" * 4096)
            with ReplicaClient(("127.0.0.1", svc.port), KEY) as admin:
                info = admin.grow_volume("vol", 2 * SIZE)
                assert admin.grow_volume("vol", SIZE)["size_bytes"] == 2 * SIZE  # no shrink
            assert info["size_bytes"] == 2 * SIZE
            c.write(2 * SIZE - 4096, b"z" * 4096)  # the open connection sees the new size
            dirty, al = c.maps()
            assert len(dirty) == 2 * SIZE // 65536 and len(al) == 2 * SIZE // (4 << 20)
        with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:  # and so does a reopening
            assert c.open("vol", 1, SIZE)["size_bytes"] == 2 * SIZE
            assert c.read(2 * SIZE - 4096, 4096) == b"z" * 4096
        assert os.path.getsize(tmp_path / "pool" / "vol" / "dirty.map") == 2 * SIZE // 65536
    finally:
        svc.stop()


def test_a_refused_open_does_not_leave_the_replica_held(tmp_path):
    """Opening with a size larger than the replica's is refused; before, the replica then
    stayed counted as open for good, and DELETE answered EBUSY forever."""
    svc = ReplicaService(str(tmp_path / "pool"), "127.0.0.1:0", KEY)
    svc.start()
    try:
        with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
            c.open("vol", 1, SIZE, create=True)
        with ReplicaClient(("127.0.0.1", svc.port), KEY) as c, pytest.raises(OSError) as ei:
            c.open("vol", 1, 2 * SIZE)
        assert ei.value.errno == errno.EEXIST
        with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
            c.delete_volume("vol")
            assert c.list_volumes() == []
    finally:
        svc.stop()


def test_the_data_path_grows_only_with_maps_that_cover_it():
    import select

    from mirror import _fastpath

    ep = select.epoll()
    try:
        dp = _fastpath.DataPath(SIZE, ep.fileno(), None, lambda *a: None, lambda *a: None)
        short = bytearray(SIZE // 65536)
        dp.set_links([], -1, [short])
        with pytest.raises(ValueError, match="shorter"):
            dp.grow(2 * SIZE)
        dp.set_links([], -1, [bytearray(2 * SIZE // 65536)])
        dp.grow(2 * SIZE)
        dp.al_add([2 * SIZE // (4 << 20) - 1])  # the new last extent exists now
        assert dp.al_hot_extents() == [2 * SIZE // (4 << 20) - 1]
        with pytest.raises(ValueError, match="never shrinks"):
            dp.grow(SIZE)
    finally:
        ep.close()


def test_a_long_zeroing_or_discard_is_mirrored_not_a_crash(env):
    """mkfs.xfs zeroes its 64 MiB log with one FALLOCATE: the activity log's range check
    refused any range longer than a write's payload (8 MiB) and the worker died."""
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"a" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    h.core.submit_write(2, wire.WRITE_ZEROES, 0, 12 * 1024 * 1024, None)
    h.core.submit_write(3, wire.DISCARD, 12 * 1024 * 1024, 4 * 1024 * 1024, None)
    assert h.spin(lambda: {2, 3} <= h.replies.keys())
    assert h.replies[2] == (0, None) and h.replies[3] == (0, None)
    for s in svcs:
        assert peek(s, 0, 4096) == bytes(4096)
