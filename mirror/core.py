"""The mirror data path: fan writes out to replicas, collect acks, degrade, resync.

Runs inside the frontend's single epoll loop; nothing here blocks except the
start-up. Per replica there is one pipelined connection (a Link, a slot of the
C DataPath in _fastpath.c). The C side moves the bytes: it reads FUSE requests,
fans plain writes out with request ids, sends plain reads, matches replies and
answers FUSE, one send per replica per drained batch. This module keeps the
policy and tells the C side what it may do alone (`dp.fast`, the write and read
sets, the activity-log extents, the gate); anything else reaches it as a slow
request, a reply to one of its own requests, or a link error.

Invariants (docs/mirror.md explains them):
- a write or flush is acknowledged only when every replica in `write_links` acked
  it, and every replica the arbiter may hold in sync is in `write_links` or has a
  Hold: until every Hold is settled (the arbiter recorded the change, and every
  in-sync replica acked a DEGRADE naming what the others lack) completions are
  held back (the gate); a failed DEGRADE is that replica's failure, never an ack;
- an in-sync replica that fails when too few others remain is not dropped: every
  write in flight or held fails first, and I/O fails until it returns or can be
  dropped (an in-sync replica missing from the write set makes I/O unavailable);
- while any replica is not in sync, every in-sync replica tracks: a DEGRADE goes
  first on its stream (at start, on return, at a resync's end), so dirty bits are
  durable before the data they cover;
- overlapping writes are never in flight together (deferred in arrival order);
- before a write leaves, its activity-log extent is durable on every replica
  (AL_ADD goes first on the same ordered stream); an extent leaves the log only
  when what it says is recorded elsewhere (dirty maps) or repaired;
- a replica is declared in sync only after every region that any reachable
  replica's dirty map or activity log names, and every write it missed since it
  returned, was copied to it; a replica not in sync is never read nor a source.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from engine.errors import Busy, NotFound, Unavailable

from . import _fastpath, regionmap, wire
from .arbiter import Arbiter, VolumeRecord
from .client import ReplicaClient, ReplicaError
from .helpers import Helpers
from .spec import (
    AL_EXTENT_BYTES,
    REGION_BYTES,
    FrontendConfig,
    ReplicaAddr,
    ReplicaState,
    ReplicaStatus,
)

log = logging.getLogger(__name__)

RSHIFT = REGION_BYTES.bit_length() - 1
IN_SYNC, OUT_OF_SYNC, RESYNCING = (
    ReplicaState.IN_SYNC,
    ReplicaState.OUT_OF_SYNC,
    ReplicaState.RESYNCING,
)

# Python-side ops; plain reads and writes in flight are C ops (K_WRITE here only while deferred)
K_WRITE, K_SYNC, K_CTRL, K_RREAD, K_RWRITE = range(5)

# what the C side accepts as a payload (the Buffer of _fastpath.pyi)
_Buffer = bytes | bytearray | memoryview

Reply = Callable[[int, int, object], None]  # (fuse unique, -errno or 0, payload bytes/view or None)


class Op:
    __slots__ = (
        "kind",
        "unique",
        "wop",
        "offset",
        "length",
        "remaining",
        "r0",
        "r1",
        "data",
        "cb",
        "job",
        "token",
    )

    def __init__(self, kind: int, unique: int = 0, wop: int = 0, offset: int = 0, length: int = 0):
        self.kind, self.unique, self.wop, self.offset, self.length = (
            kind,
            unique,
            wop,
            offset,
            length,
        )
        self.remaining = 0
        self.r0 = offset >> RSHIFT
        self.r1 = (offset + length - 1) >> RSHIFT if length else self.r0
        self.data: object = None
        self.cb: Callable | None = None
        self.job: ResyncJob | None = None
        self.token = 0  # in-flight range registration (resync copies)


class Link:
    """One replica: its state, its slot in the DataPath and what it lacks."""

    def __init__(self, addr: ReplicaAddr, regions: int, slot: int):
        self.addr = addr
        self.rid = addr.replica_id
        self.slot = slot
        self.state = OUT_OF_SYNC
        self.sock: socket.socket | None = None
        self.connecting = False
        self.needs_create = False
        self.maps_pending = False  # a gather of the replicas' maps for its return is under way
        self.planned = False  # RESYNCING: an in-sync replica's maps were merged since it returned
        self.suspect = False  # IN_SYNC: may differ in unacknowledged writes until repaired
        self.recording = False  # IN_SYNC in memory, the arbiter's record still to come
        self.last_attempt = 0.0
        self.probing = False  # a probe (INFO) is out on this link
        self.probe_sent = 0.0
        self.proven_at = 0.0  # when the newest probe it answered at our generation was sent
        self.dirty = bytearray(regions)  # regions this replica may lack (frontend's copy)
        self.replica_bytes = 0  # its size as it answered OPEN (may exceed ours: growing)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def __repr__(self) -> str:
        return f"<Link {self.rid} {self.state.value}{' connected' if self.sock else ''}>"


class Hold:
    """While a Hold is open, completions are held back (the gate). One per replica being
    recorded out of sync (or in sync): settled when the arbiter has the new state and
    every in-sync replica in `waiting` acked a DEGRADE naming what the others lack."""

    __slots__ = ("why", "waiting", "recorded", "since")

    def __init__(self, why: str, waiting: set[Link] | None = None, recorded: bool = True):
        self.why = why
        self.waiting: set[Link] = waiting or set()
        self.recorded = recorded
        self.since = time.monotonic()

    @property
    def settled(self) -> bool:
        return self.recorded and not self.waiting


class ResyncJob:
    def __init__(self, target: Link, total_regions: int, mark_in_sync: bool):
        self.target = target
        self.total = max(total_regions, 0)
        self.done = 0
        self.inflight = 0
        self.cursor = 0
        self.mark_in_sync = mark_in_sync  # False: an activity-log repair of an in-sync replica
        self.finishing = False
        self.started = time.monotonic()


class Barrier:
    """A write barrier (a consistent snapshot of every replica): new writes and flushes
    wait, those in flight drain, every replica of the write set makes what it has durable
    (SYNC); then the barrier is *held* until resume() or its deadline, whichever comes
    first. A barrier that is never resumed (its controller died) lets go by itself."""

    __slots__ = ("token", "deadline", "state", "queued", "syncing", "why", "replicas")

    DRAINING, SYNCING, HELD = "draining", "syncing", "held"

    def __init__(self, token: str, deadline: float):
        self.token = token
        self.deadline = deadline  # monotonic
        self.state = self.DRAINING
        self.queued: deque[Op] = deque()  # writes and flushes that arrived after it
        self.syncing = 0  # SYNCs still to be acked in this round
        self.why = ""
        self.replicas: list[str] = []  # HELD: the replicas identical at the barrier


class MirrorCore:
    def __init__(
        self,
        cfg: FrontendConfig,
        key: bytes,
        arbiter: Arbiter,
        reply: Reply,
        ep: select.epoll,
        owner: str,
        reply_fd: int = -1,
    ):
        """reply answers FUSE for Python; reply_fd (the /dev/fuse fd), when given, is
        where the C side answers plain reads and writes (else it calls reply too)."""
        self.cfg = cfg
        self.t = cfg.tuning
        self.min_in_sync = max(1, self.t.min_in_sync)  # 0 would acknowledge with no replica
        self.key = key
        self.arbiter = arbiter
        self.reply = reply
        self.ep = ep
        self.owner = owner
        self.size = cfg.size_bytes
        self.regions = -(-cfg.size_bytes // REGION_BYTES)
        self.extents = -(-cfg.size_bytes // AL_EXTENT_BYTES)
        self.dp = _fastpath.DataPath(
            cfg.size_bytes,
            ep.fileno(),
            reply,
            self._on_py_reply,
            self._on_link_error,
            REGION_BYTES,
            AL_EXTENT_BYTES,
            reply_fd,
        )
        self._free_slots = list(range(_fastpath.MAX_LINKS - 1, -1, -1))
        self.links = [self._new_link(a) for a in cfg.replicas]
        self.by_slot: dict[int, Link] = {link.slot: link for link in self.links}
        self.helpers = Helpers()
        self.record: VolumeRecord | None = None
        self._arb_record: VolumeRecord | None = None  # the arbiter thread's copy
        self.write_links: list[Link] = []
        self.read_link: Link | None = None
        self.missing: list[bytearray] = []  # dirty maps of replicas not receiving writes
        self.deferred: deque[Op] = deque()
        self.holds: list[Hold] = []  # open: completions are held (the gate)
        self.held: list[Op] = []  # held Python completions (syncs); the C side holds writes
        self.fenced = False
        self.arbiter_overdue = False  # a record waited for longer than arbiter_wait_s
        self.jobs: dict[str, ResyncJob] = {}
        # activity log: extents named by the replicas' logs when their maps were read (from
        # earlier frontends, or a fenced one), and extents with writes that failed: both stay
        # in the log until what they say is repaired or recorded in the in-sync dirty maps
        self.al_recovered: set[int] = set()
        self.al_pinned: set[int] = set()
        self._gathers = 0  # map gathers in flight
        self._absorbing = 0  # DEGRADE rounds recording suspects on the in-sync replicas
        self._later: deque[Callable[[], None]] = deque()  # run outside the C callbacks
        self._closing = False
        self._last_tick = 0.0
        self.barrier: Barrier | None = None
        # how the last barriers ended (token -> held until resumed), for a late resume
        self._barrier_outcomes: dict[str, bool] = {}

    def _new_link(self, addr: ReplicaAddr) -> Link:
        if not self._free_slots:
            raise Unavailable(f"at most {_fastpath.MAX_LINKS} replicas per volume")
        return Link(addr, self.regions, self._free_slots.pop())

    @property
    def gate(self) -> bool:
        return bool(self.holds)

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Take ownership (generation + 1), connect every replica, plan repairs."""
        self.record = self._arb_record = self._take_ownership()
        gen = self.record.generation
        states = self.record.replicas
        fresh = self.record.version == 1  # we just created it: every replica starts empty
        results: dict[str, tuple[Any, BaseException | None]] = {}
        given_up = False

        def opened(link: Link, res: Any, err: BaseException | None) -> None:
            if given_up and err is None:
                res[0].close()  # too late: the replica is treated as unreachable
            else:
                results[link.rid] = (res, err)

        for link in self.links:
            st = states.get(link.rid)
            link.state = ReplicaState(st) if st else OUT_OF_SYNC
            if st is None:
                link.needs_create = True
                link.dirty[:] = b"\1" * self.regions
            link.needs_create = link.needs_create or fresh
            link.connecting = True
            self.helpers.submit(
                self._opener(link, gen),
                # mypy cannot infer lambdas with default arguments
                lambda res, err, lk=link: opened(lk, res, err),  # type: ignore[misc]
            )
        deadline = time.monotonic() + self.t.io_timeout_s + 5
        while len(results) < len(self.links) and time.monotonic() < deadline:
            select.select([self.helpers.wake_fd], [], [], 0.2)
            self.helpers.drain()
        given_up = True
        for link in self.links:
            link.connecting = False
            res, err = results.get(link.rid, (None, TimeoutError("connect timed out")))
            if err is None:
                self._attach_socket(link, res)
            else:
                self._note_open_error(link, err)
        self._recompute()
        in_sync = [lk for lk in self.links if lk.state == IN_SYNC]
        if not any(lk.connected for lk in in_sync):
            log.error("no in-sync replica reachable; I/O fails until one returns")
        for link in in_sync:
            link.suspect = link.connected  # until the activity logs say otherwise
            if not link.connected:
                self._fail_link(link, "unreachable at start")
        if self._needs_tracking():
            for link in self.links:
                if link.connected and link.state == IN_SYNC:
                    self._track_on(link)
        self._recompute()
        self._gather(None)
        self.flush()

    def _take_ownership(self) -> VolumeRecord:
        published = self.cfg.generation
        while True:
            try:
                try:
                    rec = self.arbiter.get(self.cfg.volume_id)
                except NotFound:
                    new = VolumeRecord(
                        self.cfg.volume_id,
                        published or 1,
                        self.owner,
                        {a.replica_id: IN_SYNC.value for a in self.cfg.replicas},
                    )
                    got = self.arbiter.compare_and_set(new, 0)
                else:
                    if published and rec.generation > published:
                        raise _FencedError(f"published at generation {published}, but the "
                                           f"arbiter holds {rec.generation}: attached elsewhere")
                    generation = max(published, rec.generation) if published \
                        else rec.generation + 1
                    got = self.arbiter.compare_and_set(
                        replace(rec, generation=generation, owner=self.owner), rec.version
                    )
                if got is not None:
                    log.info("own %s at generation %d", self.cfg.volume_id, got.generation)
                    return got
            except Unavailable as e:
                log.warning("arbiter unreachable, waiting: %s", e)
                time.sleep(0.5)

    def _opener(self, link: Link, gen: int) -> Callable[[], tuple[socket.socket, dict]]:
        addr, create, size, vid = link.addr, link.needs_create, self.size, self.cfg.volume_id
        timeout = min(self.t.io_timeout_s, 5.0)

        def open_() -> tuple[socket.socket, dict]:
            c = ReplicaClient(addr, self.key, timeout)
            try:
                info = c.open(vid, gen, size, create=create, writer=True)
            except BaseException:
                c.close()
                raise
            return c.sock, info

        return open_

    def _note_open_error(self, link: Link, err: BaseException) -> None:
        if isinstance(err, ReplicaError) and err.errno == errno.ESTALE:
            self._fence(f"replica {link.rid} has a newer generation")
        elif isinstance(err, ReplicaError) and err.errno == errno.ENOENT:
            # the replica lost the volume (node rebuilt): recreate it and copy everything
            log.warning("replica %s has no copy of the volume: full rebuild", link.rid)
            link.needs_create = True
            link.dirty[:] = b"\1" * self.regions
            if link.state == IN_SYNC:
                self._lost_copy(link)
        else:
            log.warning("replica %s unreachable: %s", link.rid, err)

    def _attach_socket(self, link: Link, res: tuple[socket.socket, dict]) -> None:
        sock, info = res
        sock.setblocking(False)
        self.dp.attach(link.slot, sock.fileno())
        link.sock = sock
        link.needs_create = False
        link.replica_bytes = int(info.get("size_bytes") or self.size)
        link.probing = False
        log.info(
            "replica %s connected (generation %s, %s dirty regions, %s log extents)",
            link.rid,
            info.get("generation"),
            info.get("dirty_regions"),
            info.get("al_extents"),
        )

    # ------------------------------------------------------------------ what may differ
    def _needs_tracking(self) -> bool:
        return any(lk.state != IN_SYNC for lk in self.links)

    def _track_on(self, link: Link, done: Callable[[bool], None] | None = None) -> None:
        """DEGRADE on link's stream: it durably records every region the replicas not in
        sync may lack, and tracks every later write, before anything after it on the
        stream is applied. Its ack settles the link's part of the holds open now."""
        need = bytearray(self.regions)
        for lk in self.links:
            if lk.state != IN_SYNC and lk is not link:
                regionmap.union_into(need, lk.dirty)
        covered = list(self.holds)
        payloads = regionmap.u32_payloads(need) or [b""]

        def acked(_l: Link, status: int, _p: object) -> None:
            if status == 0:  # a failure is that replica's failure (_fail_link), never an ack
                for h in covered:
                    h.waiting.discard(link)
            if done is not None:
                done(status == 0)
            self._later.append(self._settle)

        for i, payload in enumerate(payloads):
            last = i == len(payloads) - 1
            self._ctrl(link, wire.DEGRADE, payload=payload, cb=acked if last else None)

    def _gather(self, returning: Link | None) -> None:
        """Read every connected replica's dirty map and activity log, then plan from their
        union (start-up: returning is None; else the replica that came back)."""
        links = [lk for lk in self.links if lk.connected]
        if not links:
            return
        if returning is not None:
            returning.maps_pending = True
        got: dict[Link, bytes] = {}
        waiting = set(links)
        self._gathers += 1

        def on_maps(link: Link, status: int, payload: object) -> None:
            if status == 0 and payload is not None:
                got[link] = bytes(cast(_Buffer, payload))
            waiting.discard(link)
            if not waiting:
                self._gathers -= 1
                self._later.append(lambda: self._plan(returning, got))

        for lk in links:
            self._ctrl(lk, wire.GET_MAPS, cb=on_maps)

    def _plan(self, returning: Link | None, got: dict[Link, bytes]) -> None:
        """Every region any of these maps names is suspect: replicas not in sync get all of
        them, in-sync ones (at start-up, or the one that returned) those of the activity
        logs. The in-sync replicas then record what the others lack, durably."""
        if returning is not None:
            returning.maps_pending = False
        if self.fenced:
            return
        per = AL_EXTENT_BYTES // REGION_BYTES
        dirty = bytearray(self.regions)
        al = bytearray(self.extents)
        from_in_sync = False
        for lk, data in got.items():
            # its maps are as long as its size, which may exceed ours (grown ahead of us)
            own = -(-(lk.replica_bytes or self.size) // REGION_BYTES)
            regionmap.union_into(dirty, data[:own])
            regionmap.union_into(al, data[own:])
            from_in_sync = from_in_sync or lk.state == IN_SYNC
        al_regions = regionmap.extents_to_regions(al, self.regions, per)
        self.al_recovered.update(regionmap.indices(al))
        suspects = bytearray(dirty)
        regionmap.union_into(suspects, al_regions)
        if regionmap.any_set(al):
            log.info("activity logs name %d extents", al.count(1))
        source = self.read_link
        for lk in self.links:
            if lk.state == IN_SYNC:
                if not lk.connected or (returning is not None and lk is not returning):
                    continue
                if lk is source:
                    lk.suspect = False
                    continue
                regionmap.union_into(lk.dirty, al_regions)
                self._start_job(lk, mark_in_sync=False)
            else:
                regionmap.union_into(lk.dirty, suspects)
                if lk.connected and lk.state == OUT_OF_SYNC:
                    lk.state = RESYNCING  # receives every new write from now on
                if lk.connected and lk.state == RESYNCING:
                    lk.planned = lk.planned or from_in_sync
                    self._start_job(lk, mark_in_sync=True)
        self._recompute()
        self._absorb()
        self.flush()

    def _absorb(self) -> None:
        """The in-sync replicas record (DEGRADE) every region the others may lack; after
        that the activity logs that named some of them are no longer needed for them."""
        targets = [lk for lk in self.links if lk.connected and lk.state == IN_SYNC]
        if not self._needs_tracking() or not targets:
            self._trim_recovered_al()
            return
        self._absorbing += 1
        left = set(targets)

        def one(link: Link, _ok: bool) -> None:
            left.discard(link)
            if not left:
                self._absorbing -= 1
                self._later.append(self._trim_recovered_al)

        for s in targets:
            # mypy cannot infer lambdas with default arguments
            self._track_on(s, lambda ok, s=s: one(s, ok))  # type: ignore[misc]

    def _trim_recovered_al(self) -> None:
        """Once nothing depends on them: the recovered extents leave the activity logs, and
        so do our own cold ones. A cold extent (no write in flight) that is not pinned says
        nothing a dirty map does not (its writes completed on every replica of the write
        set; the in-sync ones tracked those the others missed), and each extent left in the
        log costs a copy to every replica not in sync after a crash: trimmed here, when a
        resync starts, a crash during the resync only repeats what was really in flight."""
        if self._absorbing or self._gathers or self.holds or any(
            not j.mark_in_sync for j in self.jobs.values()
        ):
            return
        cold = self.dp.al_evict(0, 0)  # every extent without a write in flight
        keep = [e for e in cold if e in self.al_pinned]
        if keep:
            self.dp.al_add(keep)
        stale = {e for e in self.al_recovered if not self.dp.al_is_hot(e)}
        stale.update(e for e in cold if e not in self.al_pinned)
        stale -= self.al_pinned
        self.al_recovered.clear()
        if stale:
            payload = wire.pack_u32s(sorted(stale))
            for s in self.write_links:
                self._ctrl(s, wire.AL_REMOVE, payload=payload)

    # ------------------------------------------------------------------ membership
    def _recompute(self) -> None:
        self.write_links = [
            lk for lk in self.links if lk.connected and lk.state in (IN_SYNC, RESYNCING)
        ]
        self.missing = [lk.dirty for lk in self.links if lk not in self.write_links]
        readable = [lk for lk in self.links if lk.connected and lk.state == IN_SYNC]
        pref = self.cfg.preferred_read_replica
        # a replica still being repaired is read only when no other in-sync one is there
        readable.sort(key=lambda lk: (lk.suspect, lk.rid != pref))
        self.read_link = readable[0] if readable else None
        self.dp.set_links(
            [lk.slot for lk in self.write_links],
            self.read_link.slot if self.read_link else -1,
            self.missing,
        )
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """The C side may take plain reads and writes alone only when no policy is in the way."""
        self.dp.fast = (not self.fenced and not self.deferred and not self._unavailable()
                        and self.barrier is None)

    def in_sync_count(self) -> int:
        return sum(1 for lk in self.links if lk.connected and lk.state == IN_SYNC)

    def status(self) -> list[ReplicaStatus]:
        out = []
        for lk in self.links:
            job = self.jobs.get(lk.rid)
            out.append(
                ReplicaStatus(
                    lk.rid,
                    RESYNCING if lk.recording else lk.state,
                    lk.connected,
                    job.done * REGION_BYTES if job else 0,
                    job.total * REGION_BYTES if job else 0,
                )
            )
        return out

    # ------------------------------------------------------------------ submission
    def _unavailable(self) -> bool:
        """I/O fails: fenced, too few in-sync replicas, an in-sync one is away and not
        yet recorded out of sync (it may be the only one with the latest writes), or the
        arbiter is overdue with a record that acknowledgements wait for."""
        return (
            self.fenced
            or self.arbiter_overdue
            or self.in_sync_count() < self.min_in_sync
            or any(lk.state == IN_SYNC and not lk.connected for lk in self.links)
        )

    def submit_write(self, unique: int, wop: int, offset: int, length: int, data: object) -> None:
        """A write the C side did not take (or any write, in tests)."""
        if offset < 0 or length <= 0 or offset + length > self.size or length > 0xFFFFFFFF:
            self.reply(unique, -errno.EINVAL, None)
            return
        if wop == wire.WRITE and (data is None or len(data) != length):  # type: ignore[arg-type]
            self.reply(unique, -errno.EINVAL, None)
            return
        if self.barrier is not None:  # held back until the barrier lets go
            op = Op(K_WRITE, unique, wop, offset, length)
            op.data = bytes(data) if data is not None else None  # type: ignore[call-overload]
            self.barrier.queued.append(op)
            return
        if self._unavailable():
            self.reply(unique, -errno.EIO, None)
            return
        if self.deferred or self.dp.conflicts(offset, length):
            op = Op(K_WRITE, unique, wop, offset, length)
            op.data = bytes(data) if data is not None else None  # type: ignore[call-overload]
            self.deferred.append(op)
            self.dp.fast = False  # later writes queue behind this one, in arrival order
            return
        self._issue_write(unique, wop, offset, length, data)

    def _issue_write(self, unique: int, wop: int, offset: int, length: int, data: object) -> None:
        # activity log: the extent must be durable on every replica before the write lands
        new = self.dp.al_cold(offset, length)
        if new:
            payload = wire.pack_u32s(new)
            for link in self.write_links:
                self._ctrl(link, wire.AL_ADD, payload=payload)
            self.dp.al_add(new)
        self.dp.issue_write(unique, wop, offset, length, data if wop == wire.WRITE else None)

    def submit_read(self, unique: int, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.reply(unique, -errno.EINVAL, None)
            return
        if self.fenced:
            self.reply(unique, -errno.EIO, None)
            return
        if length == 0:
            self.reply(unique, 0, b"")
            return
        if not self.dp.issue_read(unique, offset, length):
            self.reply(unique, -errno.EIO, None)

    def submit_sync(self, unique: int) -> None:
        if self.barrier is not None:  # in order with the writes held back
            self.barrier.queued.append(Op(K_SYNC, unique))
            return
        if self._unavailable():
            self.reply(unique, -errno.EIO, None)
            return
        op = Op(K_SYNC, unique)
        links = self.write_links
        op.remaining = len(links)
        for link in links:
            self._send(link, op, wire.SYNC)
        if not links:  # cannot happen while available (min_in_sync >= 1): never ack on nothing
            self.reply(unique, -errno.EIO, None)

    def _send(
        self,
        link: Link,
        op: Op,
        wop: int,
        offset: int = 0,
        count: int = 0,
        payload: _Buffer | None = None,
        flags: int = 0,
    ) -> None:
        self.dp.send(link.slot, op, wop, flags, offset, count, payload)

    def _ctrl(
        self,
        link: Link,
        wop: int,
        payload: bytes = b"",
        flags: int = 0,
        cb: Callable[[Link, int, object], None] | None = None,
        offset: int = 0,
        count: int = 0,
    ) -> None:
        op = Op(K_CTRL, 0, wop)
        op.cb = cb
        if not self.dp.send(link.slot, op, wop, flags, offset, count, payload or None) and cb:
            cb(link, -errno.ENOTCONN, None)  # detached: it never left

    # ------------------------------------------------------------------ I/O events
    def flush(self) -> None:
        """One send per replica per drained batch."""
        self.dp.flush()

    def poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        """Wait for and handle FUSE and replica events; returns the other fds' events.
        While nothing here needs to see every event (no write barrier, no deferred write),
        the C loop keeps handling its own events for up to tuning.poll_spin_ms first."""
        spin = self.t.poll_spin_ms if self.barrier is None and not self.deferred else 0
        others = self.dp.poll(timeout_ms, spin)
        self._after_events()
        return others

    def on_event(self, fd: int, ev: int) -> None:
        """An event on a DataPath fd (its epoll tag), for callers with their own loop."""
        self.dp.on_event(fd, ev)
        self._after_events()

    def _after_events(self) -> None:
        self._run_later()
        if self.deferred:
            self._run_deferred()
        if self.barrier is not None:
            self._barrier_step()
        self.dp.flush()

    def _run_later(self) -> None:
        while self._later:
            self._later.popleft()()

    def _on_link_error(self, slot: int, status: int, why: str) -> None:
        link = self.by_slot.get(slot)
        if link is None or not link.connected:
            self.dp.detach(slot, _fastpath.DETACH_DROP)
            return
        if status == -errno.ESTALE:
            self._fence(f"replica {link.rid} reports a newer generation")
            return
        if status < 0:
            log.warning("replica %s failed %s: %s", link.rid, why, os.strerror(-status))
            why = f"status {status}"
        self._fail_link(link, why)

    def _on_py_reply(self, slot: int, op: Op, status: int, payload: memoryview) -> None:
        link = self.by_slot[slot]
        kind = op.kind
        if kind == K_SYNC:
            if op.remaining > 0:
                op.remaining -= 1
                if op.remaining == 0:
                    self._complete(op)
        elif kind == K_CTRL:
            if op.cb is not None:
                op.cb(link, status, payload)
        elif kind == K_RREAD:
            self._resync_read_done(link, op, payload)
        elif kind == K_RWRITE:
            self._resync_write_done(op)

    def _complete(self, op: Op) -> None:
        if self.gate:
            self.held.append(op)
        else:
            self.reply(op.unique, 0, None)

    def _run_deferred(self) -> None:
        blocked: set[int] = set()
        keep: deque[Op] = deque()
        while self.deferred:
            op = self.deferred.popleft()
            regs = range(op.r0, op.r1 + 1)
            if any(r in blocked for r in regs) or self.dp.conflicts(op.offset, op.length):
                keep.append(op)
                blocked.update(regs)  # later overlapping ops stay behind this one
                continue
            if self._unavailable():
                self.reply(op.unique, -errno.EIO, None)
                continue
            self._issue_write(op.unique, op.wop, op.offset, op.length, op.data)
        self.deferred = keep
        self._refresh_fast()

    # ------------------------------------------------------------------ periodic
    def tick(self) -> None:
        self._run_later()
        now = time.monotonic()
        if now - self._last_tick < 0.1:
            return
        self._last_tick = now
        for link in self.links:
            oldest = self.dp.oldest(link.slot) if link.connected else None
            if oldest is not None and now - oldest > self.t.io_timeout_s:
                self._fail_link(link, f"no reply for {self.t.io_timeout_s}s")
            elif (
                not link.connected
                and not link.connecting
                and not self.fenced
                and now - link.last_attempt > self.t.reconnect_interval_s
                and self.record
            ):
                link.connecting = True
                link.last_attempt = now
                self.helpers.submit(
                    self._opener(link, self.record.generation),
                    # mypy cannot infer lambdas with default arguments
                    lambda res, err, lk=link: self._on_reconnect(lk, res, err),  # type: ignore[misc]
                )
            elif (
                link.state == RESYNCING
                and link.connected
                and not link.planned
                and not link.maps_pending
                and self.read_link is not None
            ):
                # its maps were gathered without an in-sync replica's: ask again
                self._gather(link)
        self._drop_unreachable_in_sync()
        self._probe(now)
        self._check_arbiter_wait(now)
        self._evict_al()
        self._unpin_when_healthy()
        self._pump_jobs()
        self._run_later()
        if self.barrier is not None:
            if now > self.barrier.deadline:
                log.warning("write barrier %s let go after its deadline (%s)",
                            self.barrier.token, self.barrier.state)
                self._barrier_release(held=False)
            else:
                self._barrier_step()
        self.flush()

    def _probe(self, now: float) -> None:
        """One INFO at a time per connected link, every probe_interval_s: a replica checks
        the connection's generation on every op but PING, so an answer proves it was not
        fenced when it got the probe (a refusal, -ESTALE, fences this frontend)."""
        every = self.t.probe_interval_s
        if every <= 0 or self.fenced:
            return
        for link in self.links:
            if link.connected and not link.probing and now - link.probe_sent >= every:
                link.probing, link.probe_sent = True, now

                def answered(lk: Link, status: int, _p: object, sent: float = now) -> None:
                    lk.probing = False
                    if status == 0:
                        lk.proven_at = max(lk.proven_at, sent)

                self._ctrl(link, wire.INFO, cb=answered)

    def proof_of_ownership(self, since: float) -> tuple[int, int]:
        """(proven, needed): the in-sync replicas whose link answered a probe sent at or
        after `since` (monotonic), and how many must have for no newer frontend to be able
        to serve. A newer frontend needs min_in_sync of the N replicas in sync at its
        generation, and a replica opened at a newer generation refuses this frontend's
        requests from then on; so while more than N - min_in_sync of them answer us, no
        newer frontend can have the replicas it needs (needs probe_interval_s > 0)."""
        if self.fenced:
            return 0, 1
        proven = sum(1 for lk in self.links if lk.connected and lk.state == IN_SYNC
                     and not lk.recording and lk.proven_at >= since)
        replicas = {lk.rid for lk in self.links} | set(self.record.replicas if self.record else ())
        return proven, max(1, len(replicas) - self.min_in_sync + 1)

    def _check_arbiter_wait(self, now: float) -> None:
        """A record that acknowledgements wait for, overdue: fail what waits, and I/O until
        it is recorded (_settle lifts this); not an indefinite stall."""
        limit = self.t.arbiter_wait_s
        if limit <= 0 or self.arbiter_overdue or self.fenced:
            return
        late = [h for h in self.holds if not h.recorded and now - h.since > limit]
        if late:
            self.arbiter_overdue = True
            self._fail_all(f"the arbiter has not recorded '{late[0].why}' within {limit:g} s")

    def _evict_al(self) -> None:
        cold = self.dp.al_evict(self.t.al_max_extents, int(self.t.al_max_extents * 0.9))
        if not cold:
            return
        keep = [e for e in cold if e in self.al_pinned or e in self.al_recovered]
        if keep:
            self.dp.al_add(keep)  # never left the replicas' logs: only back in our hot set
        gone = [e for e in cold if e not in self.al_pinned and e not in self.al_recovered]
        if gone:
            payload = wire.pack_u32s(gone)
            for link in self.write_links:
                self._ctrl(link, wire.AL_REMOVE, payload=payload)

    def _unpin_when_healthy(self) -> None:
        """Extents of failed writes may leave the log once every replica is in sync again and
        every repair is done (the returning replicas were repaired from the logs)."""
        if (
            self.al_pinned
            and not self.jobs
            and not self.holds
            and not self._gathers
            and all(lk.state == IN_SYNC and lk.connected and not lk.suspect for lk in self.links)
        ):
            self.al_pinned.clear()

    # ------------------------------------------------------------------ failures
    def _close(self, link: Link, mode: int = _fastpath.DETACH_DROP,
               graceful: bool = False) -> tuple[list, list, list]:
        """Detach from the DataPath (see its detach modes) and close the socket."""
        if mode == _fastpath.DETACH_ACK:
            self.dp.hold = True  # what completes here waits for _settle, never straight out
        pending = self.dp.detach(link.slot, mode)
        if link.sock is not None:
            if not graceful:
                # abortive close (RST): writes still queued in the kernel must never reach
                # the replica later, after a resync has copied their regions
                link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            link.sock.close()
        link.sock = None
        link.last_attempt = time.monotonic()
        return pending

    def _hold(self, hold: Hold) -> Hold:
        self.holds.append(hold)
        self.dp.hold = True
        return hold

    def _settle(self) -> None:
        """Drop settled holds; with none left, answer what was held back (unless a failure
        came meanwhile: then it fails, never succeeds)."""
        self.holds = [h for h in self.holds if not h.settled]
        self.dp.hold = bool(self.holds)
        if self.arbiter_overdue and all(h.recorded for h in self.holds):
            self.arbiter_overdue = False
            log.warning("the arbiter recorded what I/O waited for: I/O resumes")
        if not self.holds and (self.dp.held or self.held):
            if self._unavailable():
                self._fail_all("completions held across a failure")
            else:
                self.dp.release_held()
                held, self.held = self.held, []
                for op in held:
                    self.reply(op.unique, 0, None)
        self._refresh_fast()

    def _fail_link(self, link: Link, why: str) -> None:
        """Drop a replica: survivors track, the arbiter records it, then acks resume.
        With too few in-sync replicas left it is kept in sync and I/O fails instead."""
        was = link.state
        log.warning("replica %s (%s) failed: %s", link.rid, was.value, why)
        others = sum(
            1 for lk in self.links if lk is not link and lk.connected and lk.state == IN_SYNC
        )
        in_sync = was == IN_SYNC and not self.fenced
        dropping = in_sync and others >= self.min_in_sync
        failing = in_sync and not dropping
        survivors = {lk for lk in self.links if lk is not link and lk.state == IN_SYNC}
        hold: Hold | None = None
        if failing:
            # nothing may complete from here: writes in flight and held ones fail first
            self._fail_all(f"fewer than {self.min_in_sync} in-sync replicas reachable")
        elif dropping:
            hold = self._hold(Hold(f"drop {link.rid}", survivors, recorded=False))
        elif was == RESYNCING and link.connected and self.dp.pending(link.slot):
            # writes it had pending complete without it once the in-sync replicas track them
            hold = self._hold(Hold(f"resync target {link.rid} lost", survivors))
        mode = _fastpath.DETACH_DROP if self.fenced else (
            _fastpath.DETACH_FAIL if failing else _fastpath.DETACH_ACK)
        pyops, regions, reads = self._close(link, mode)
        job = self.jobs.pop(link.rid, None)
        if was == RESYNCING or dropping:
            link.state = OUT_OF_SYNC
        link.suspect = link.planned = link.recording = False
        if link.state != IN_SYNC:
            for h in self.holds:
                h.waiting.discard(link)
        for r0, r1 in regions:
            link.dirty[r0 : r1 + 1] = b"\1" * (r1 - r0 + 1)
        self._recompute()
        for op in pyops:
            k = op.kind
            if k == K_SYNC:
                if op.remaining > 0:
                    if failing:
                        op.remaining = -1
                        self.reply(op.unique, -errno.EIO, None)
                    else:
                        op.remaining -= 1
                        if op.remaining == 0:
                            self._complete(op)
            elif k == K_CTRL:
                if op.cb is not None:
                    op.cb(link, -errno.EIO, None)
            elif k in (K_RREAD, K_RWRITE):
                self._resync_chunk_failed(op)
        for unique, offset, length in reads:
            self.submit_read(unique, offset, length)
        if job is not None:
            job.inflight = 0
        if hold is not None:
            for s in self.links:
                if s in hold.waiting and s.connected:
                    self._track_on(s)
            if dropping:
                self._record(link.rid, OUT_OF_SYNC, hold)
        self._settle()
        self.flush()

    def _lost_copy(self, link: Link) -> None:
        """An in-sync replica without its copy is out of sync whatever the others are, and
        recorded so before anything is acknowledged without it. With no other in-sync
        replica I/O fails: a recreated, empty copy is never a source."""
        log.error("replica %s was in sync and lost its copy", link.rid)
        survivors = {lk for lk in self.links if lk is not link and lk.state == IN_SYNC}
        hold = self._hold(Hold(f"{link.rid} lost its copy", survivors, recorded=False))
        link.state = OUT_OF_SYNC
        link.suspect = link.planned = link.recording = False
        for h in self.holds:
            h.waiting.discard(link)
        self._recompute()
        for s in survivors:
            if s.connected:
                self._track_on(s)
        self._record(link.rid, OUT_OF_SYNC, hold)
        self._settle()

    def _drop_unreachable_in_sync(self) -> None:
        """An in-sync replica kept while too few others were reachable is dropped as soon
        as enough are (before that, I/O fails: see _unavailable)."""
        for lk in list(self.links):
            if (
                lk.state == IN_SYNC
                and not lk.connected
                and not self.fenced
                and self.in_sync_count() >= self.min_in_sync
            ):
                self._fail_link(lk, "unreachable while the others serve")

    def _record(
        self,
        rid: str,
        st: ReplicaState | None,
        hold: Hold | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Have the arbiter record rid's state (None: remove it), retried until it sticks;
        arbiter writes happen one at a time, in the order they are asked for."""

        def done(res: object, err: BaseException | None) -> None:
            if isinstance(err, _FencedError):
                self._fence(str(err))
                return
            if err is not None:
                log.error("arbiter: %s stays unrecorded: %s", rid, err)
                return
            rec = cast(VolumeRecord, res)
            if self.record is None or rec.version > self.record.version:
                self.record = rec
            if hold is not None:
                hold.recorded = True
                self._settle()
            if then is not None:
                then()

        self.helpers.submit_arbiter(lambda: self._cas_until(rid, st), done)

    def _cas_until(self, rid: str, st: ReplicaState | None) -> VolumeRecord:
        """Runs on the arbiter thread. Raises _FencedError; retries while unreachable."""
        warned = False
        while True:
            try:
                return self._cas_once(rid, st)
            except Unavailable as e:
                if self._closing:
                    raise
                if not warned:
                    log.warning("arbiter: %s; I/O stays blocked, retrying", e)
                    warned = True
                time.sleep(0.5)

    def _cas_once(self, rid: str, st: ReplicaState | None) -> VolumeRecord:
        assert self._arb_record is not None
        rec = self._arb_record
        for _ in range(10):
            new = rec.without_replica(rid) if st is None else rec.with_replica(rid, st.value)
            got = self.arbiter.compare_and_set(new, rec.version)
            if got is not None:
                self._arb_record = got
                return got
            try:
                rec = self.arbiter.get(self.cfg.volume_id)
            except NotFound:
                raise _FencedError("the volume's record is gone") from None
            if rec.generation != self._arb_record.generation or rec.owner != self.owner:
                raise _FencedError(f"generation {rec.generation} owned by {rec.owner}")
        raise Unavailable("arbiter CAS kept losing")

    def _fail_all(self, why: str) -> None:
        log.error("failing I/O: %s", why)
        # a failed write may have reached some replicas and not others: its extents stay in
        # the activity log until every replica is in sync and repaired again
        self.al_pinned.update(self.dp.al_hot_extents())
        held, self.held = self.held, []
        for op in held:
            self.reply(op.unique, -errno.EIO, None)
        self.dp.fail_writes(errno.EIO)  # writes in flight and held ones
        for link in self.links:
            for op in self.dp.python_ops(link.slot):
                if op.kind == K_SYNC and op.remaining > 0:
                    op.remaining = -1
                    self.reply(op.unique, -errno.EIO, None)
        while self.deferred:
            self.reply(self.deferred.popleft().unique, -errno.EIO, None)
        self._refresh_fast()

    def self_fence(self, why: str) -> None:
        """Stop serving for good (the frontend lost what it serves under: its lease)."""
        self._fence(why)

    def _fence(self, why: str) -> None:
        if self.fenced:
            return
        log.error("fenced: %s; every request now fails", why)
        self.fenced = True
        self.holds.clear()
        self.dp.hold = False
        if self.barrier is not None:  # what it held back fails below with everything else
            self._barrier_release(held=False)
        self._fail_all(why)
        for link in self.links:
            _, _, reads = self._close(link, _fastpath.DETACH_DROP)
            for unique, _, _ in reads:
                self.reply(unique, -errno.EIO, None)
        self._recompute()

    # ------------------------------------------------------------------ resync
    def _on_reconnect(self, link: Link, res: object, err: BaseException | None) -> None:
        link.connecting = False
        if link not in self.links:  # removed meanwhile
            if err is None:
                res[0].close()  # type: ignore[index]
            return
        if err is not None:
            self._note_open_error(link, err)
            return
        if self.fenced:
            res[0].close()  # type: ignore[index]
            return
        self._attach_socket(link, res)  # type: ignore[arg-type]
        if link.state == IN_SYNC:
            # kept in sync while too few others were reachable: it tracks before any write
            # reaches it if another replica is out of sync, and is repaired from the logs
            if self._needs_tracking() or any(link in h.waiting for h in self.holds):
                self._track_on(link)
            link.suspect = True
            self._recompute()
            self._drop_unreachable_in_sync()
        else:
            link.state = RESYNCING  # receives every new write from now on
            link.planned = False
            self._recompute()
        self._gather(link)
        self._settle()
        self.flush()

    def _start_job(self, link: Link, mark_in_sync: bool) -> None:
        remaining = link.dirty.count(1)
        job = self.jobs.get(link.rid)
        if job is None:
            if not mark_in_sync and remaining == 0:
                link.suspect = False
                self._recompute()
                return
            job = ResyncJob(link, remaining, mark_in_sync)
            self.jobs[link.rid] = job
            log.info("%s of %s: %d regions", "resync" if mark_in_sync else "repair", link.rid,
                     job.total)
        else:
            job.total = job.done + remaining
            job.cursor = 0
        self._pump_jobs()

    def add_full_rebuild(self, link: Link) -> None:
        link.dirty[:] = b"\1" * self.regions

    def _pump_jobs(self) -> None:
        if not self.jobs or self.gate or self.fenced:
            return
        src = self.read_link
        if src is None:
            return
        chunk_regions = max(1, self.t.resync_chunk_bytes // REGION_BYTES)
        for job in list(self.jobs.values()):
            link = job.target
            if not link.connected or job.finishing:
                continue
            if link is src:
                # its own source failed: it is the authority now, nothing to repair it from
                del self.jobs[link.rid]
                link.suspect = False
                link.dirty[:] = bytes(self.regions)
                continue
            dirty = link.dirty
            scanned_from_zero = job.cursor == 0
            while job.inflight < self.t.resync_inflight_chunks:
                i = dirty.find(1, job.cursor)
                if i < 0:
                    if not scanned_from_zero:
                        job.cursor, scanned_from_zero = 0, True
                        continue
                    break
                j = i + 1
                while j < self.regions and j - i < chunk_regions and dirty[j]:
                    j += 1
                off = i * REGION_BYTES
                length = min(j * REGION_BYTES, self.size) - off
                if self.dp.conflicts(off, length):
                    job.cursor = j  # an application write is in flight there: come back later
                    continue
                op = Op(K_RREAD, 0, wire.READ, off, length)
                op.job = job
                job.cursor = j
                dirty[i:j] = bytes(j - i)
                op.token = self.dp.register(
                    off, length
                )  # application writes there wait for the copy
                job.inflight += 1
                op.data = (link, j - i)
                self._send(src, op, wire.READ, off, length, flags=wire.F_SPARSE)
            if job.inflight == 0 and dirty.find(1) < 0:
                self._finish_job(job)

    def _resync_read_done(self, src: Link, op: Op, payload: memoryview) -> None:
        link, _n = cast("tuple[Link, int]", op.data)
        job = op.job
        if len(payload) not in (0, op.length):
            # a malformed answer from the source: never copied anywhere
            self._resync_chunk_failed(op)
            self._fail_link(src, f"resync read of {len(payload)} bytes, not {op.length}")
            return
        if job is None or self.jobs.get(link.rid) is not job or not link.connected:
            self._resync_chunk_failed(op)
            return
        wop = Op(K_RWRITE, 0, wire.WRITE, op.offset, op.length)
        wop.job, wop.data, wop.r0, wop.r1 = job, op.data, op.r0, op.r1
        wop.cb = op  # type: ignore[assignment]  # the range registration to release
        if len(payload) == 0:
            self._send(link, wop, wire.DISCARD, op.offset, op.length)
        else:
            self._send(link, wop, wire.WRITE, op.offset, op.length, payload)

    def _resync_write_done(self, wop: Op) -> None:
        rop: Op = wop.cb  # type: ignore[assignment]
        job = wop.job
        assert job is not None
        job.inflight -= 1
        job.done += wop.r1 - wop.r0 + 1
        others_out = any(lk.state != IN_SYNC and lk is not job.target for lk in self.links)
        if job.mark_in_sync and not others_out:
            # cleared ahead of any application write to these regions on the same streams
            payload = wire.pack_u32s(range(wop.r0, wop.r1 + 1))
            for s in self.links:
                if s.connected and s.state == IN_SYNC:
                    self._ctrl(s, wire.CLEAR_DIRTY, payload=payload)
        self.dp.unregister(rop.token)
        if self.deferred:
            self._run_deferred()
        self._pump_jobs()

    def _resync_chunk_failed(self, op: Op) -> None:
        link, n = cast("tuple[Link, int]", op.data)
        rop = op.cb if op.kind == K_RWRITE else op
        if isinstance(rop, Op):
            self.dp.unregister(rop.token)  # idempotent
        link.dirty[op.r0 : op.r1 + 1] = b"\1" * (op.r1 - op.r0 + 1)
        if op.job is not None:
            op.job.inflight = max(0, op.job.inflight - 1)
        if self.deferred:
            self._run_deferred()

    def _finish_job(self, job: ResyncJob) -> None:
        link = job.target
        took = time.monotonic() - job.started
        if not job.mark_in_sync:
            log.info("repair of %s copied %d regions in %.2fs", link.rid, job.done, took)
            del self.jobs[link.rid]
            link.suspect = False
            self._recompute()
            self._trim_recovered_al()
            return
        if link.maps_pending or not link.planned or self._gathers:
            return  # not proven yet: the maps that name what it lacks are still to come
        job.finishing = True
        log.info("resync of %s copied %d regions in %.2fs", link.rid, job.done, took)
        if self._needs_tracking() and any(
            lk.state != IN_SYNC for lk in self.links if lk is not link
        ):
            # it becomes a source for the others: first it records what they lack
            self._track_on(link, lambda ok: self._promote(job) if ok else None)
        else:
            self._promote(job)

    def _promote(self, job: ResyncJob) -> None:
        """In sync in memory at once (it has every write), the gate closed until the arbiter
        has it: a write acknowledged from now on may depend on it being in sync."""
        link = job.target
        if self.jobs.get(link.rid) is not job or not link.connected or link.state != RESYNCING:
            return
        if job.inflight or link.dirty.find(1) >= 0 or link.maps_pending or self._gathers:
            job.finishing = False  # more to copy after all
            return
        del self.jobs[link.rid]
        link.state = IN_SYNC
        link.planned = False
        link.recording = True
        self._recompute()
        hold = self._hold(Hold(f"{link.rid} in sync", recorded=False))

        def recorded() -> None:
            link.recording = False
            log.info("replica %s is in sync again", link.rid)
            if all(lk.state == IN_SYNC and lk.connected for lk in self.links):
                for s in self.write_links:
                    self._ctrl(s, wire.CLEAR_DIRTY, flags=wire.F_ALL)
                self.flush()

        self._record(link.rid, IN_SYNC, hold, recorded)
        self._drop_unreachable_in_sync()

    # ------------------------------------------------------------------ control plane
    def add_replica(self, addr: ReplicaAddr) -> None:
        """A new, empty replica: recorded out of sync, then fully rebuilt."""
        if any(lk.rid == addr.replica_id for lk in self.links):
            return
        link = self._new_link(addr)
        link.needs_create = True
        link.dirty[:] = b"\1" * self.regions
        self.links.append(link)
        self.by_slot[link.slot] = link
        self._recompute()
        self._record(addr.replica_id, OUT_OF_SYNC)

    def remove_replica(self, rid: str) -> None:
        link = next((lk for lk in self.links if lk.rid == rid), None)
        if link is None:
            return
        if link.state == IN_SYNC and sum(1 for lk in self.links if lk.state == IN_SYNC) <= 1:
            raise Unavailable(f"{rid} is the last in-sync replica")
        if link.connected or link.state == IN_SYNC:
            # drained and recorded out of sync like a failure, so nothing waits on it and
            # nothing is acknowledged without it before the arbiter knows
            self._fail_link(link, "removed by the control plane")
        self.links.remove(link)
        del self.by_slot[link.slot]
        self._free_slots.append(link.slot)
        self.jobs.pop(rid, None)
        for h in self.holds:
            h.waiting.discard(link)
        self._recompute()
        self._settle()
        self._record(rid, None)

    # ------------------------------------------------------------------ write barrier
    def barrier_begin(self, token: str, timeout_s: float) -> dict:
        """Raise a write barrier (or report the one of this token): see Barrier. Returns
        {"state", "replicas", "generation"}; poll until state is "held"."""
        b = self.barrier
        if b is not None and b.token != token:
            raise Busy(f"another write barrier ({b.token}) is up")
        if b is None:
            if token in self._barrier_outcomes:
                raise Unavailable(f"write barrier {token} already let go")
            if self.fenced:
                raise Unavailable("the frontend is fenced: it serves no writes to hold")
            if not 0 < timeout_s <= 300:
                raise ValueError(f"barrier timeout {timeout_s} s is outside (0, 300]")
            b = self.barrier = Barrier(token, time.monotonic() + timeout_s)
            self._refresh_fast()  # from now on every write comes through submit_write
            log.info("write barrier %s up (at most %.1f s)", token, timeout_s)
            self._barrier_step()
            self.flush()
        return {"state": b.state, "replicas": list(b.replicas), "why": b.why,
                "generation": self.record.generation if self.record else 0}

    def barrier_end(self, token: str) -> bool:
        """Let the barrier of this token go; True when it was held from the moment it
        said so until now (the replicas did not change meanwhile), False otherwise (it
        let go at its deadline, was never held, or is unknown to this worker)."""
        b = self.barrier
        if b is not None and b.token == token:
            held = b.state == Barrier.HELD
            self._barrier_release(held)
            self.flush()
            return held
        return self._barrier_outcomes.get(token, False)

    def _barrier_step(self) -> None:
        """Drive the barrier: once nothing is deferred or held back by a hold, every
        replica of the write set syncs (its reply comes after every earlier request on its
        stream: every write issued before the barrier is then on every replica); held
        once every SYNC of a round was acked with the membership unchanged."""
        b = self.barrier
        assert b is not None
        if b.state == Barrier.HELD:
            return
        if b.state == Barrier.SYNCING and b.syncing:
            return
        if b.state == Barrier.SYNCING and not b.syncing:
            if not self.holds and not self.deferred:
                b.replicas = self._identical()
                if b.replicas:
                    b.state = Barrier.HELD
                    log.info("write barrier %s held: %s identical", b.token,
                             ", ".join(b.replicas))
                    return
                b.why = "no in-sync replica to take a consistent copy from"
            b.state = Barrier.DRAINING  # membership changed meanwhile: another round
        if self.deferred or self.holds or self.fenced:
            return
        links = list(self.write_links)
        if not links:
            b.why = "no replica receives writes"
            return
        b.state = Barrier.SYNCING
        b.syncing = len(links)
        failed = False

        def synced(_link: Link, status: int, _p: object) -> None:
            nonlocal failed
            failed = failed or status != 0
            b.syncing -= 1
            if b.syncing == 0 and failed and b.state == Barrier.SYNCING:
                b.state = Barrier.DRAINING  # a replica failed on the way: start over
            if self.barrier is b:
                self._later.append(self._barrier_step)

        for link in links:
            self._ctrl(link, wire.SYNC, cb=synced)

    def _identical(self) -> list[str]:
        """The replicas holding the same bytes now: in sync, connected, not being repaired
        from the activity logs, recorded in sync by the arbiter."""
        return [lk.rid for lk in self.links if lk.connected and lk.state == IN_SYNC
                and not lk.suspect and not lk.recording]

    def _barrier_release(self, held: bool) -> None:
        b = self.barrier
        assert b is not None
        self.barrier = None
        self._barrier_outcomes[b.token] = held
        while len(self._barrier_outcomes) > 16:
            del self._barrier_outcomes[next(iter(self._barrier_outcomes))]
        self._refresh_fast()
        log.info("write barrier %s down (%s); %d requests it held go on", b.token,
                 "held" if held else "not held", len(b.queued))
        for op in b.queued:  # in arrival order: they were never issued
            if op.kind == K_SYNC:
                self.submit_sync(op.unique)
            else:
                self.submit_write(op.unique, op.wop, op.offset, op.length, op.data)

    # ------------------------------------------------------------------ growth
    def grow(self, size_bytes: int) -> None:
        """The volume grew (every replica was grown by the control plane first): writes
        and reads may reach the new range from now on, which is zeros on every replica."""
        if size_bytes <= self.size:
            return
        if size_bytes % 4096:
            raise ValueError(f"size {size_bytes} is not a multiple of 4096")
        regions = -(-size_bytes // REGION_BYTES)
        for link in self.links:  # longer maps first: C marks them on every write
            link.dirty = link.dirty + bytes(regions - len(link.dirty))
        self._recompute()
        self.dp.grow(size_bytes)
        self.size = size_bytes
        self.regions = regions
        self.extents = -(-size_bytes // AL_EXTENT_BYTES)
        log.info("grown to %d bytes", size_bytes)

    def pending(self) -> int:
        """Requests sent to replicas and not answered yet."""
        return sum(self.dp.pending(lk.slot) for lk in self.links)

    def idle(self) -> bool:
        return (not self.pending() and not self.deferred and not self.held
                and not self.dp.held and self.barrier is None)

    def clear_activity_log(self) -> None:
        """Clean shutdown: nothing in flight, so no extent needs repair next time, unless
        a repair or a record of what may differ is still under way, or writes failed."""
        if self.jobs or self.holds or self._absorbing or self._gathers:
            self.flush()
            return
        ext = sorted((set(self.dp.al_hot_extents()) | self.al_recovered) - self.al_pinned)
        if ext:
            for s in self.write_links:
                self._ctrl(s, wire.AL_REMOVE, payload=wire.pack_u32s(ext))
                self._ctrl(s, wire.SYNC)
            self.dp.al_clear()
            if self.al_pinned:
                self.dp.al_add(sorted(self.al_pinned))
            self.al_recovered.clear()
        self.flush()

    def close(self) -> None:
        """Clean stop: what is queued for the replicas (the last CLEAR_DIRTY, activity-log
        removals) goes out before each connection ends with a FIN. Only failed links are
        closed abortively (_close): a clean stop has no write in flight, and a later
        frontend's generation fences anything stale anyway."""
        self._closing = True
        self.flush()
        for link in self.links:
            if link.sock is not None:
                try:
                    link.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # already gone: nothing left to deliver
            self._close(link, graceful=True)
        self.helpers.close()


class _FencedError(Exception):
    pass
