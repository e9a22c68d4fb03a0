"""MirrorCore driven directly (no FUSE, no root): ordering, degrade, arbiter, fencing."""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pytest

from engine.errors import Unavailable
from mirror import wire
from mirror.arbiter import SqliteArbiter, VolumeRecord
from mirror.client import ReplicaClient
from mirror.core import MirrorCore
from mirror.replica_server import ReplicaService
from mirror.spec import (
    AL_EXTENT_BYTES,
    REGION_BYTES,
    FrontendConfig,
    FrontendTuning,
    ReplicaAddr,
    ReplicaState,
)

KEY = b"k" * 32
SIZE = 16 * 1024 * 1024


class FlakyArbiter:
    def __init__(self, inner: SqliteArbiter):
        self.inner = inner
        self.down = False
        self.before_cas = None  # test hook: called with each record about to be stored

    def get(self, volume_id: str) -> VolumeRecord:
        if self.down:
            raise Unavailable("arbiter down (test)")
        return self.inner.get(volume_id)

    def compare_and_set(self, record: VolumeRecord, expected_version: int) -> VolumeRecord | None:
        if self.down:
            raise Unavailable("arbiter down (test)")
        if self.before_cas is not None:
            self.before_cas(record)
        return self.inner.compare_and_set(record, expected_version)


class Harness:
    def __init__(self, tmp, svcs, arbiter, owner="fe-1", preferred=None, **tuning):
        self.svcs = svcs
        cfg = FrontendConfig("vol", SIZE,
                             tuple(ReplicaAddr(f"r{i + 1}", "127.0.0.1", s.port)
                                   for i, s in enumerate(svcs)),
                             str(tmp), "", "sqlite:unused",
                             tuning=FrontendTuning(io_timeout_s=1.0, reconnect_interval_s=0.2,
                                                   node_safety=False, **tuning),
                             preferred_read_replica=preferred)
        self.replies: dict[int, tuple[int, object]] = {}
        self.order: list[int] = []
        self.ep = select.epoll()
        self.core = MirrorCore(cfg, KEY, arbiter, self._reply, self.ep, owner)
        self.core.start()
        self.ep.register(self.core.helpers.wake_fd, select.EPOLLIN)

    def _reply(self, unique, err, payload):
        if payload is not None and not isinstance(payload, int):
            payload = bytes(payload)
        self.replies[unique] = (err, payload)
        self.order.append(unique)

    def spin(self, until=lambda: False, timeout_s=5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.core.flush()
            for fd, ev in self.ep.poll(0.02):
                if fd == self.core.helpers.wake_fd:
                    self.core.helpers.drain()
                else:
                    self.core.on_event(fd, ev)
            self.core.flush()
            self.core.tick()
            if until():
                return True
        return False

    def write(self, unique, offset, data):
        self.core.submit_write(unique, wire.WRITE, offset, len(data), data)

    def settled(self) -> bool:
        """Everything in sync and connected, no repair, record or gather under way."""
        c = self.core
        busy = c.jobs or c.holds or c._gathers or c._later
        return not busy and all(
            lk.state == ReplicaState.IN_SYNC and lk.connected and not lk.suspect
            and not lk.recording for lk in c.links)


@pytest.fixture
def env(tmp_path):
    svcs = [ReplicaService(str(tmp_path / f"pool{i}"), "127.0.0.1:0", KEY) for i in range(2)]
    for s in svcs:
        s.start()
    arb = FlakyArbiter(SqliteArbiter(str(tmp_path / "arb.db")))
    made = []

    def make(**kw):
        h = Harness(tmp_path, svcs, arb, **kw)
        made.append(h)
        return h

    yield svcs, arb, make
    for h in made:
        h.core.close()
    for s in svcs:
        s.stop()


def read_replica(svc, offset, n):
    with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
        c.open("vol", 10**9)  # a reader from the far future: fine for a check at the end
        return c.read(offset, n)


def test_write_read_sync_and_acks(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 8192, b"a" * 4096)
    h.core.submit_sync(2)
    assert h.spin(lambda: 2 in h.replies)
    assert h.replies[1] == (0, 4096) and h.replies[2] == (0, None)
    h.core.submit_read(3, 8192, 4096)
    assert h.spin(lambda: 3 in h.replies)
    assert h.replies[3] == (0, b"a" * 4096)
    assert arb.get("vol").generation == 1


def test_overlapping_writes_are_serialised(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"1" * 8192)
    h.write(2, 4096, b"2" * 4096)  # overlaps 1: must wait for it
    h.write(3, 4096, b"3" * 4096)  # overlaps 2: must follow it
    assert len(h.core.deferred) == 2
    assert h.spin(lambda: {1, 2, 3} <= h.replies.keys())
    assert h.order == [1, 2, 3]
    h.core.close()
    for s in svcs:
        assert read_replica(s, 0, 8192) == b"1" * 4096 + b"3" * 4096


def test_degrade_waits_for_arbiter_and_tracks_dirty_on_survivor(env):
    svcs, arb, make = env
    h = make()
    h.write(1, 0, b"x" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    arb.down = True
    svcs[1].stop()  # replica 2 goes away: its connection drops
    h.write(2, 5 * 65536, b"y" * 4096)
    assert not h.spin(lambda: 2 in h.replies, timeout_s=1.5), "acked without the arbiter"
    arb.down = False
    assert h.spin(lambda: 2 in h.replies, timeout_s=5)
    assert h.replies[2] == (0, 4096)
    assert arb.get("vol").replicas == {"r1": "in_sync", "r2": "out_of_sync"}
    with ReplicaClient(("127.0.0.1", svcs[0].port), KEY) as c:
        c.open("vol", arb.get("vol").generation)
        dirty, _ = c.maps()
        assert dirty[5] == 1 and c.get_info()["tracking"] is True


def test_too_few_replicas_fails_io_instead_of_diverging(env):
    svcs, arb, make = env
    h = make(min_in_sync=2)
    svcs[1].stop()
    h.write(1, 0, b"x" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    assert h.replies[1][0] == -errno.EIO
    assert arb.get("vol").replicas["r2"] == "in_sync"  # never dropped: no write went without it


def test_new_frontend_fences_the_old_one(env):
    svcs, arb, make = env
    old = make(owner="old")
    old.write(1, 0, b"o" * 4096)
    assert old.spin(lambda: 1 in old.replies)
    new = make(owner="new")
    assert arb.get("vol").generation == 2
    old.write(2, 0, b"X" * 4096)
    assert old.spin(lambda: 2 in old.replies)
    assert old.replies[2][0] == -errno.EIO and old.core.fenced
    new.core.submit_read(9, 0, 4096)
    assert new.spin(lambda: 9 in new.replies)
    assert new.replies[9] == (0, b"o" * 4096)


def test_resync_copies_only_dirty_regions(env, tmp_path):
    svcs, arb, make = env
    h = make()
    svcs[1].stop()
    for i in range(8):
        h.write(10 + i, i * 65536 * 4, os.urandom(4096))
    assert h.spin(lambda: all(10 + i in h.replies for i in range(8)))
    assert h.core.status()[1].state == ReplicaState.OUT_OF_SYNC
    svcs[1] = ReplicaService(svcs[1].pool_dir, f"127.0.0.1:{svcs[1].port}", KEY)
    svcs[1].start()
    assert h.spin(lambda: h.core.status()[1].state == ReplicaState.IN_SYNC, timeout_s=10)
    st = h.core.status()
    # in sync in memory first; recorded by the arbiter next, and only then do the
    # sources stop tracking (CLEAR_DIRTY): wait for that before the clean stop
    assert h.spin(lambda: not any(lk.recording for lk in h.core.links), timeout_s=10)
    assert arb.get("vol").replicas["r2"] == "in_sync"
    h.core.close()
    for i in range(8):
        assert read_replica(svcs[0], i * 262144, 4096) == read_replica(svcs[1], i * 262144, 4096)
    with ReplicaClient(("127.0.0.1", svcs[0].port), KEY) as c:
        c.open("vol", 10**9)
        assert c.get_info()["tracking"] is False and c.get_info()["dirty_regions"] == 0
    assert all(s.state == ReplicaState.IN_SYNC for s in st)


def restart(svcs, i):
    """Replica service i back on its port, same pool."""
    svcs[i] = ReplicaService(svcs[i].pool_dir, f"127.0.0.1:{svcs[i].port}", KEY)
    svcs[i].start()


def prepare(svcs, arb, states: dict[str, str]):
    """Both replicas exist at generation 1 with the same first block; the arbiter holds
    `states` (what a previous frontend left)."""
    arb.inner.compare_and_set(VolumeRecord("vol", 1, "previous", states), 0)
    for s in svcs:
        with ReplicaClient(("127.0.0.1", s.port), KEY) as c:
            c.open("vol", 1, SIZE, create=True, writer=True)
            c.write(0, b"a" * 4096)


def checksum(svc) -> bytes:
    with ReplicaClient(("127.0.0.1", svc.port), KEY) as c:
        c.open("vol", 10**9)
        return c.checksum()


def test_writes_a_fenced_frontend_left_on_one_replica_are_repaired(env):
    """The previous frontend's last write reached r2 only (r1 had fenced it, say), behind
    an activity-log entry on r2 alone. The new frontend reads every replica's log, not
    only the source's (before: r1's empty log; the replicas stayed different)."""
    svcs, arb, make = env
    prepare(svcs, arb, {"r1": "in_sync", "r2": "in_sync"})
    with ReplicaClient(("127.0.0.1", svcs[1].port), KEY) as c:
        c.open("vol", 1, writer=True)
        c.call(wire.AL_ADD, payload=wire.pack_u32s([2]))
        c.write(2 * AL_EXTENT_BYTES + 8192, b"z" * 4096)
    h = make()
    assert h.spin(h.settled, timeout_s=5)
    h.core.close()
    assert checksum(svcs[0]) == checksum(svcs[1]), "the replicas differ"


def test_the_in_sync_replica_tracks_while_another_is_out_of_sync(env):
    """r1 is out of sync and away; r2 never got a DEGRADE (the previous frontend's failed).
    A write acknowledged by r2 alone must be in r2's durable dirty map before the ack
    (before: r2 was not even tracking, so a crash would lose the write for r1)."""
    svcs, arb, make = env
    prepare(svcs, arb, {"r1": "out_of_sync", "r2": "in_sync"})
    svcs[0].stop()
    h = make()
    h.write(1, 5 * REGION_BYTES, b"t" * 4096)
    assert h.spin(lambda: 1 in h.replies)
    assert h.replies[1] == (0, 4096)
    with ReplicaClient(("127.0.0.1", svcs[1].port), KEY) as c:
        c.open("vol", arb.get("vol").generation)  # a reader: fences nobody
        dirty, _ = c.maps()
        assert c.get_info()["tracking"] is True and dirty[5] == 1


def test_an_in_sync_replica_away_is_recorded_out_of_sync_before_writes_go_on(env):
    """Both replicas unreachable at start: neither can be dropped. When r1 returns, r2
    must be recorded out of sync before a write is acknowledged by r1 alone (before: r2
    stayed in sync in the arbiter, missing acknowledged writes)."""
    svcs, arb, make = env
    svcs[0].stop()
    svcs[1].stop()
    h = make()
    h.write(1, 0, b"e" * 4096)
    assert h.spin(lambda: 1 in h.replies) and h.replies[1][0] == -errno.EIO
    restart(svcs, 0)
    assert h.spin(lambda: h.core.links[0].connected, timeout_s=5)
    h.write(2, 0, b"f" * 4096)
    assert h.spin(lambda: 2 in h.replies)
    assert h.replies[2] == (0, 4096)
    assert arb.get("vol").replicas == {"r1": "in_sync", "r2": "out_of_sync"}


def test_a_replica_failing_while_recorded_in_sync_ends_out_of_sync(env):
    """r2's resync ends and its in_sync record is under way when r2 fails again. A write
    acknowledged without r2 must find the arbiter holding r2 out of sync (before: the
    late in_sync record stuck, though r2 missed that write)."""
    svcs, arb, make = env
    h = make()
    svcs[1].stop()
    h.write(1, 0, b"1" * 4096)
    assert h.spin(lambda: 1 in h.replies and arb.get("vol").replicas["r2"] == "out_of_sync")
    reached, release = threading.Event(), threading.Event()

    def hook(rec: VolumeRecord) -> None:
        if rec.replicas.get("r2") == "in_sync":
            reached.set()
            release.wait(10)

    arb.before_cas = hook
    restart(svcs, 1)
    assert h.spin(reached.is_set, timeout_s=5), "the resync never ended"
    svcs[1].stop()
    assert h.spin(lambda: not h.core.links[1].connected)
    h.write(2, 9 * REGION_BYTES, b"2" * 4096)
    h.spin(timeout_s=0.3)
    release.set()
    assert h.spin(lambda: 2 in h.replies, timeout_s=5)
    assert h.replies[2] == (0, 4096)
    assert h.spin(lambda: not h.core.holds, timeout_s=5)
    assert arb.get("vol").replicas["r2"] == "out_of_sync", "r2 in sync without the write"


def test_no_write_or_flush_is_acknowledged_with_no_replica(env):
    """min_in_sync 0 (a configuration mistake) once let every replica be dropped; the
    next write and flush then completed with nobody holding them."""
    svcs, arb, make = env
    h = make(min_in_sync=0)
    svcs[0].stop()
    svcs[1].stop()
    assert h.spin(lambda: not any(lk.connected for lk in h.core.links))
    h.write(1, 0, b"0" * 4096)
    h.core.submit_sync(2)
    assert h.spin(lambda: {1, 2} <= h.replies.keys())
    assert h.replies[1][0] == -errno.EIO and h.replies[2][0] == -errno.EIO


def test_an_in_sync_replica_that_lost_its_copy_is_never_a_source(env):
    """r1 is the only in-sync replica and its node lost the volume (OPEN: ENOENT). It used
    to be recreated empty and kept in sync: reads returned zeros and r2 was "resynced"
    from it. Now it is recorded out of sync and I/O fails: nothing left can prove the
    data."""
    svcs, arb, make = env
    prepare(svcs, arb, {"r1": "in_sync", "r2": "out_of_sync"})
    with ReplicaClient(("127.0.0.1", svcs[0].port), KEY) as c:
        c.delete_volume("vol")
    h = make()
    h.spin(timeout_s=1.0)
    h.core.submit_read(1, 0, 4096)
    assert h.spin(lambda: 1 in h.replies)
    assert h.replies[1][0] == -errno.EIO, "served from a replica that lost its copy"
    assert h.spin(lambda: arb.get("vol").replicas["r1"] == "out_of_sync", timeout_s=3)
    with ReplicaClient(("127.0.0.1", svcs[1].port), KEY) as c:  # r2 was left alone
        c.open("vol", 10**9)
        assert c.read(0, 4096) == b"a" * 4096


def test_a_returning_replica_is_not_read_before_its_repair(env):
    """Two in-sync replicas, both needed (min_in_sync 2): r2 dies with a write in flight
    that r1 applied; the write fails, r2 stays in sync. When r2 (the preferred reader)
    returns, reads stay on r1 until r2 is repaired from the logs: a read never returns
    what a later read will not, and the replicas end identical (before: r2 became the
    read source at once and, being the source, was never repaired at all)."""
    svcs, arb, make = env
    h = make(preferred="r2", min_in_sync=2)
    h.write(1, 0, b"1" * 4096)
    assert h.spin(lambda: 1 in h.replies) and h.replies[1] == (0, 4096)
    svcs[1].stop()
    h.write(2, 0, b"2" * 4096)  # goes out before the frontend notices: r1 applies it
    assert h.spin(lambda: 2 in h.replies) and h.replies[2][0] == -errno.EIO
    restart(svcs, 1)
    assert h.spin(lambda: h.core.links[1].connected, timeout_s=5)
    h.core.submit_read(3, 0, 4096)
    assert h.spin(lambda: 3 in h.replies)
    assert h.spin(h.settled, timeout_s=5)
    h.core.submit_read(4, 0, 4096)
    assert h.spin(lambda: 4 in h.replies)
    assert h.replies[3] == h.replies[4], "the block changed between two reads"
    assert checksum(svcs[0]) == checksum(svcs[1])


def test_probes_prove_the_replicas_serve_this_generation_and_reveal_a_takeover(env):
    """With probes on, the core can say how many in-sync replicas answered at its
    generation lately; a replica that stops answering stops counting; and an idle
    frontend whose replicas a newer one opened learns it from the next probe, with no
    I/O of its own (before: nothing told it until its next request)."""
    svcs, arb, make = env
    old = make(owner="old", probe_interval_s=0.1)
    start = time.monotonic()
    assert old.spin(lambda: old.core.proof_of_ownership(start) == (2, 2), timeout_s=3)
    svcs[1].test_delay_s = 0.8  # r2 answers, but late
    time.sleep(0.3)
    recent = time.monotonic()
    assert old.spin(lambda: old.core.proof_of_ownership(recent - 0.2)[0] == 1, timeout_s=3)
    svcs[1].test_delay_s = 0.0
    assert old.spin(lambda: old.core.proof_of_ownership(time.monotonic() - 0.5)[0] == 2,
                    timeout_s=5)
    new = make(owner="new")
    assert old.spin(lambda: old.core.fenced, timeout_s=2), "the takeover went unnoticed"
    assert old.core.proof_of_ownership(0.0)[0] == 0
    new.core.submit_read(1, 0, 4096)
    assert new.spin(lambda: 1 in new.replies) and new.replies[1][0] == 0


def test_an_overdue_arbiter_fails_io_until_it_records_the_change(env):
    """A replica must be dropped while the arbiter is down: writes wait at most
    arbiter_wait_s, then fail (EIO) at once, reads go on; once the arbiter records the
    drop, writes are acknowledged again (before: they waited for as long as it was down)."""
    svcs, arb, make = env
    h = make(arbiter_wait_s=0.6)
    h.write(1, 0, b"x" * 4096)
    assert h.spin(lambda: 1 in h.replies) and h.replies[1] == (0, 4096)
    arb.down = True
    svcs[1].stop()
    h.write(2, 65536, b"y" * 4096)
    assert not h.spin(lambda: 2 in h.replies, timeout_s=0.4), "acked without the arbiter"
    assert h.spin(lambda: 2 in h.replies, timeout_s=2) and h.replies[2][0] == -errno.EIO
    h.write(3, 2 * 65536, b"z" * 4096)
    assert h.spin(lambda: 3 in h.replies, timeout_s=0.5) and h.replies[3][0] == -errno.EIO
    h.core.submit_read(4, 0, 4096)
    assert h.spin(lambda: 4 in h.replies) and h.replies[4] == (0, b"x" * 4096)
    arb.down = False
    assert h.spin(lambda: not h.core.arbiter_overdue, timeout_s=5)
    h.write(5, 3 * 65536, b"w" * 4096)
    assert h.spin(lambda: 5 in h.replies) and h.replies[5] == (0, 4096)
    assert arb.get("vol").replicas == {"r1": "in_sync", "r2": "out_of_sync"}
