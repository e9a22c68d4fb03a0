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
- a write is acknowledged only when every replica in `write_links` acked it;
- overlapping writes are never in flight together (deferred in arrival order);
- before a write leaves, its activity-log extent is durable on every replica
  (AL_ADD goes first on the same ordered stream);
- a replica is dropped only after survivors durably track dirty regions
  (DEGRADE acked) and the arbiter recorded it out of sync; until then every
  completion is held back (the gate);
- a replica not in sync is never read and never a resync source.
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

from engine.errors import NotFound, Unavailable

from . import _fastpath, wire
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
        self.maps_pending = False
        self.last_attempt = 0.0
        self.dirty = bytearray(regions)  # regions this replica may lack (frontend's copy)

    @property
    def connected(self) -> bool:
        return self.sock is not None


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
        self.key = key
        self.arbiter = arbiter
        self.reply = reply
        self.ep = ep
        self.owner = owner
        self.size = cfg.size_bytes
        self.regions = -(-cfg.size_bytes // REGION_BYTES)
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
        self.write_links: list[Link] = []
        self.read_link: Link | None = None
        self.missing: list[bytearray] = []  # dirty maps of replicas not receiving writes
        self.deferred: deque[Op] = deque()
        self.al_recovered: set[int] = set()
        self.gate = 0  # > 0: completions are held (a replica is being dropped)
        self.held: list[Op] = []  # held Python completions (syncs); the C side holds writes
        self.fenced = False
        self.jobs: dict[str, ResyncJob] = {}
        self._last_tick = 0.0

    def _new_link(self, addr: ReplicaAddr) -> Link:
        if not self._free_slots:
            raise Unavailable(f"at most {_fastpath.MAX_LINKS} replicas per volume")
        return Link(addr, self.regions, self._free_slots.pop())

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Take ownership (generation + 1), connect every replica, plan repairs."""
        self.record = self._take_ownership()
        gen = self.record.generation
        states = self.record.replicas
        fresh = self.record.version == 1  # we just created it: every replica starts empty
        results: dict[str, tuple[Any, BaseException | None]] = {}
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
                lambda res, err, lk=link: results.__setitem__(lk.rid, (res, err)),  # type: ignore[misc]
            )
        deadline = time.monotonic() + self.t.io_timeout_s + 5
        while len(results) < len(self.links) and time.monotonic() < deadline:
            select.select([self.helpers.wake_fd], [], [], 0.2)
            self.helpers.drain()
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
            if not link.connected:
                self._fail_link(link, "unreachable at start")
        source = self.read_link
        if source is not None:
            self._ctrl(source, wire.GET_MAPS, cb=self._on_startup_maps)
        self.flush()

    def _take_ownership(self) -> VolumeRecord:
        while True:
            try:
                try:
                    rec = self.arbiter.get(self.cfg.volume_id)
                except NotFound:
                    new = VolumeRecord(
                        self.cfg.volume_id,
                        1,
                        self.owner,
                        {a.replica_id: IN_SYNC.value for a in self.cfg.replicas},
                    )
                    got = self.arbiter.compare_and_set(new, 0)
                else:
                    got = self.arbiter.compare_and_set(
                        replace(rec, generation=rec.generation + 1, owner=self.owner), rec.version
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
        else:
            log.warning("replica %s unreachable: %s", link.rid, err)

    def _attach_socket(self, link: Link, res: tuple[socket.socket, dict]) -> None:
        sock, info = res
        sock.setblocking(False)
        self.dp.attach(link.slot, sock.fileno())
        link.sock = sock
        link.needs_create = False
        log.info(
            "replica %s connected (generation %s, %s dirty regions)",
            link.rid,
            info.get("generation"),
            info.get("dirty_regions"),
        )

    def _on_startup_maps(self, link: Link, status: int, payload: object) -> None:
        if status < 0:
            return
        data = bytes(cast(_Buffer, payload))
        dirty, al = data[: self.regions], data[self.regions :]
        al_regions = bytearray(self.regions)
        per = AL_EXTENT_BYTES // REGION_BYTES
        for e, b in enumerate(al):
            if b:
                self.al_recovered.add(e)
                al_regions[e * per : (e + 1) * per] = b"\1" * per
        del al_regions[self.regions :]
        for other in self.links:
            if other is link:
                continue
            if other.state == IN_SYNC:
                if self.al_recovered and other.connected:
                    _or_into(other.dirty, al_regions)
                    self._start_job(other, mark_in_sync=False)
            else:
                # survivors tracked every write since the drop (durably, before applying it),
                # so the activity log adds nothing here and would defeat resuming
                _or_into(other.dirty, dirty)
                if other.connected and other.state == OUT_OF_SYNC:
                    other.state = RESYNCING
                    self._recompute()
                    self._start_job(other, mark_in_sync=True)
        if not self.al_recovered:
            return
        log.info("activity log holds %d extents from the previous frontend", len(self.al_recovered))

    # ------------------------------------------------------------------ membership
    def _recompute(self) -> None:
        self.write_links = [
            lk for lk in self.links if lk.connected and lk.state in (IN_SYNC, RESYNCING)
        ]
        self.missing = [lk.dirty for lk in self.links if lk not in self.write_links]
        readable = [lk for lk in self.links if lk.connected and lk.state == IN_SYNC]
        pref = self.cfg.preferred_read_replica
        readable.sort(key=lambda lk: lk.rid != pref)
        self.read_link = readable[0] if readable else None
        self.dp.set_links(
            [lk.slot for lk in self.write_links],
            self.read_link.slot if self.read_link else -1,
            self.missing,
        )
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """The C side may take plain reads and writes alone only when no policy is in the way."""
        self.dp.fast = not self.fenced and not self.deferred and not self._unavailable()

    def in_sync_count(self) -> int:
        return sum(1 for lk in self.links if lk.connected and lk.state == IN_SYNC)

    def status(self) -> list[ReplicaStatus]:
        out = []
        for lk in self.links:
            job = self.jobs.get(lk.rid)
            out.append(
                ReplicaStatus(
                    lk.rid,
                    lk.state,
                    lk.connected,
                    job.done * REGION_BYTES if job else 0,
                    job.total * REGION_BYTES if job else 0,
                )
            )
        return out

    # ------------------------------------------------------------------ submission
    def _unavailable(self) -> bool:
        return self.fenced or self.in_sync_count() < self.t.min_in_sync

    def submit_write(self, unique: int, wop: int, offset: int, length: int, data: object) -> None:
        """A write the C side did not take (or any write, in tests)."""
        if offset < 0 or length <= 0 or offset + length > self.size or length > 0xFFFFFFFF:
            self.reply(unique, -errno.EINVAL, None)
            return
        if wop == wire.WRITE and (data is None or len(data) != length):  # type: ignore[arg-type]
            self.reply(unique, -errno.EINVAL, None)
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
        if self._unavailable():
            self.reply(unique, -errno.EIO, None)
            return
        op = Op(K_SYNC, unique)
        links = self.write_links
        op.remaining = len(links)
        for link in links:
            self._send(link, op, wire.SYNC)
        if not links:
            self._complete(op)

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
        self._send(link, op, wop, offset, count, payload or None, flags)

    # ------------------------------------------------------------------ I/O events
    def flush(self) -> None:
        """One send per replica per drained batch."""
        self.dp.flush()

    def poll(self, timeout_ms: int) -> list[tuple[int, int]]:
        """Wait for and handle FUSE and replica events; returns the other fds' events."""
        others = self.dp.poll(timeout_ms)
        if self.deferred:
            self._run_deferred()
            self.dp.flush()
        return others

    def on_event(self, fd: int, ev: int) -> None:
        """An event on a DataPath fd (its epoll tag), for callers with their own loop."""
        self.dp.on_event(fd, ev)
        if self.deferred:
            self._run_deferred()
            self.dp.flush()

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
            op.remaining -= 1
            if op.remaining == 0:
                self._complete(op)
        elif kind == K_CTRL:
            if op.cb is not None:
                op.cb(link, status, payload)
        elif kind == K_RREAD:
            self._resync_read_done(op, payload)
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
                and link.rid not in self.jobs
                and not link.maps_pending
                and self.read_link is not None
                and not self.gate
            ):
                # the maps request was lost with a failed source: ask the current one
                self._request_maps(link)
        self._evict_al()
        self._pump_jobs()
        self.flush()

    def _evict_al(self) -> None:
        cold = self.dp.al_evict(self.t.al_max_extents, int(self.t.al_max_extents * 0.9))
        if cold:
            payload = wire.pack_u32s(cold)
            for link in self.write_links:
                self._ctrl(link, wire.AL_REMOVE, payload=payload)

    # ------------------------------------------------------------------ failures
    def _close(self, link: Link, mode: int = _fastpath.DETACH_DROP,
               graceful: bool = False) -> tuple[list, list, list]:
        """Detach from the DataPath (see its detach modes) and close the socket."""
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

    def _set_gate(self, gate: int) -> None:
        self.gate = gate
        self.dp.hold = gate > 0

    def _fail_link(self, link: Link, why: str) -> None:
        """Drop a replica: survivors track, the arbiter records it, then acks resume."""
        was = link.state
        log.warning("replica %s (%s) failed: %s", link.rid, was.value, why)
        drop_in_sync = was == IN_SYNC
        others = sum(
            1 for lk in self.links if lk is not link and lk.connected and lk.state == IN_SYNC
        )
        dropping = drop_in_sync and others >= self.t.min_in_sync and not self.fenced
        if dropping:
            self._set_gate(
                self.gate + 1
            )  # no ack without this replica until survivors and arbiter know
        # with too few replicas the replica is not dropped: its pending writes fail instead
        failing = drop_in_sync and not dropping
        pyops, regions, reads = self._close(
            link, _fastpath.DETACH_FAIL if failing else _fastpath.DETACH_ACK
        )
        job = self.jobs.pop(link.rid, None)
        if was == RESYNCING or dropping:
            link.state = OUT_OF_SYNC
        self._recompute()
        marks: set[int] = set()
        for r0, r1 in regions:
            link.dirty[r0 : r1 + 1] = b"\1" * (r1 - r0 + 1)
            marks.update(range(r0, r1 + 1))
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
        if dropping:
            self._degrade(link, sorted(marks))
        elif failing:
            self._fail_all(f"fewer than {self.t.min_in_sync} in-sync replicas reachable")
        elif marks and self.write_links:
            payload = wire.pack_u32s(sorted(marks))
            for s in self.write_links:
                self._ctrl(s, wire.DEGRADE, payload=payload)
        self.flush()

    def _degrade(self, link: Link, marks: list[int]) -> None:
        state = {"acks": len(self.write_links), "arbiter": False}

        def maybe_open() -> None:
            if state["acks"] <= 0 and state["arbiter"]:
                self._open_gate()

        def on_ack(_l: Link, status: int, _p: object) -> None:
            state["acks"] -= 1  # a survivor that fails here is dropped on its own
            maybe_open()

        payload = wire.pack_u32s(marks)
        for s in list(self.write_links):
            self._ctrl(s, wire.DEGRADE, payload=payload, cb=on_ack)

        def arbiter_done(res: object, err: BaseException | None) -> None:
            if err is not None:
                if isinstance(err, _FencedError):
                    self._fence(str(err))
                    return
                log.warning("arbiter: %s; I/O stays blocked, retrying", err)

                def retry() -> VolumeRecord:
                    time.sleep(0.5)
                    return self._cas_state(link.rid, OUT_OF_SYNC)

                self.helpers.submit(retry, arbiter_done)
                return
            self.record = res  # type: ignore[assignment]
            state["arbiter"] = True
            maybe_open()

        self.helpers.submit(lambda: self._cas_state(link.rid, OUT_OF_SYNC), arbiter_done)

    def _cas_state(self, rid: str, st: ReplicaState | None) -> VolumeRecord:
        """Runs on a helper thread. Raises Unavailable (retry) or _FencedError."""
        assert self.record is not None
        rec = self.record
        for _ in range(10):
            new = rec.without_replica(rid) if st is None else rec.with_replica(rid, st.value)
            got = self.arbiter.compare_and_set(new, rec.version)
            if got is not None:
                return got
            rec = self.arbiter.get(self.cfg.volume_id)
            if rec.generation != self.record.generation or rec.owner != self.owner:
                raise _FencedError(f"generation {rec.generation} owned by {rec.owner}")
        raise Unavailable("arbiter CAS kept losing")

    def _open_gate(self) -> None:
        self._set_gate(self.gate - 1)
        if self.gate == 0:
            self.dp.release_held()
            held, self.held = self.held, []
            for op in held:
                self.reply(op.unique, 0, None)

    def _fail_all(self, why: str) -> None:
        log.error("failing I/O: %s", why)
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

    def _fence(self, why: str) -> None:
        if self.fenced:
            return
        log.error("fenced: %s; every request now fails", why)
        self.fenced = True
        self._set_gate(0)
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
            # never dropped (too few replicas): the activity log covers what may differ
            self._recompute()
            if self.read_link is not None and self.read_link is not link:
                self._ctrl(
                    self.read_link, wire.GET_MAPS, cb=lambda s, st, p: self._al_repair(link, st, p)
                )
            return
        link.state = RESYNCING  # receives every new write from now on
        self._recompute()
        if self.read_link is not None:
            self._request_maps(link)
        self.flush()

    def _request_maps(self, link: Link) -> None:
        assert self.read_link is not None
        link.maps_pending = True
        self._ctrl(
            self.read_link, wire.GET_MAPS, cb=lambda s, st, p: self._merge_and_start(link, st, p)
        )

    def _al_repair(self, link: Link, status: int, payload: object) -> None:
        if status < 0 or not link.connected:
            return
        al = bytes(cast(_Buffer, payload))[self.regions :]
        per = AL_EXTENT_BYTES // REGION_BYTES
        for e, b in enumerate(al):
            if b:
                link.dirty[e * per : min((e + 1) * per, self.regions)] = b"\1" * (
                    min((e + 1) * per, self.regions) - e * per
                )
        self._start_job(link, mark_in_sync=False)

    def _merge_and_start(self, link: Link, status: int, payload: object) -> None:
        link.maps_pending = False
        if status < 0 or link.state != RESYNCING:
            return
        _or_into(link.dirty, bytes(cast(_Buffer, payload))[: self.regions])
        self._start_job(link, mark_in_sync=True)

    def _start_job(self, link: Link, mark_in_sync: bool) -> None:
        job = ResyncJob(link, link.dirty.count(1), mark_in_sync)
        self.jobs[link.rid] = job
        log.info("resync of %s: %d regions", link.rid, job.total)
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

    def _resync_read_done(self, op: Op, payload: memoryview) -> None:
        link, _n = cast("tuple[Link, int]", op.data)
        job = op.job
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
        self.dp.unregister(rop.token)
        job = wop.job
        assert job is not None
        job.inflight -= 1
        job.done += wop.r1 - wop.r0 + 1
        if self.deferred:
            self._run_deferred()
        others_out = any(lk.state != IN_SYNC and lk is not job.target for lk in self.links)
        if job.mark_in_sync and not others_out:
            payload = wire.pack_u32s(range(wop.r0, wop.r1 + 1))
            for s in self.links:
                if s.connected and s.state == IN_SYNC:
                    self._ctrl(s, wire.CLEAR_DIRTY, payload=payload)
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
        job.finishing = True
        took = time.monotonic() - job.started
        log.info("resync of %s copied %d regions in %.2fs", link.rid, job.done, took)
        if not job.mark_in_sync:
            del self.jobs[link.rid]
            self._after_al_repair()
            return

        def done(res: object, err: BaseException | None) -> None:
            if self.jobs.get(link.rid) is not job:
                return
            if err is not None:
                if isinstance(err, _FencedError):
                    self._fence(str(err))
                    return
                job.finishing = False  # retried on the next tick
                return
            self.record = res  # type: ignore[assignment]
            del self.jobs[link.rid]
            if link.state == RESYNCING and link.connected:
                link.state = IN_SYNC
                self._recompute()
                log.info("replica %s is in sync again", link.rid)
            if all(lk.state == IN_SYNC for lk in self.links):
                for s in self.write_links:
                    self._ctrl(s, wire.CLEAR_DIRTY, flags=wire.F_ALL)
                self.flush()

        self.helpers.submit(lambda: self._cas_state(link.rid, IN_SYNC), done)

    def _after_al_repair(self) -> None:
        if any(not j.mark_in_sync for j in self.jobs.values()):
            return
        stale = [e for e in self.al_recovered if not self.dp.al_is_hot(e)]
        self.al_recovered.clear()
        if stale:
            payload = wire.pack_u32s(sorted(stale))
            for s in self.write_links:
                self._ctrl(s, wire.AL_REMOVE, payload=payload)

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

        def done(res: object, err: BaseException | None) -> None:
            if err is None:
                self.record = res  # type: ignore[assignment]

        self.helpers.submit(lambda: self._cas_state(addr.replica_id, OUT_OF_SYNC), done)

    def remove_replica(self, rid: str) -> None:
        link = next((lk for lk in self.links if lk.rid == rid), None)
        if link is None:
            return
        if link.state == IN_SYNC and sum(1 for lk in self.links if lk.state == IN_SYNC) <= 1:
            raise Unavailable(f"{rid} is the last in-sync replica")
        if link.connected:
            # drained like a failure, so nothing in flight waits on it
            self._fail_link(link, "removed by the control plane")
        self.links.remove(link)
        del self.by_slot[link.slot]
        self._free_slots.append(link.slot)
        self.jobs.pop(rid, None)
        self._recompute()

        def done(res: object, err: BaseException | None) -> None:
            if err is None:
                self.record = res  # type: ignore[assignment]

        self.helpers.submit(lambda: self._cas_state(rid, None), done)

    def pending(self) -> int:
        """Requests sent to replicas and not answered yet."""
        return sum(self.dp.pending(lk.slot) for lk in self.links)

    def idle(self) -> bool:
        return not self.pending() and not self.deferred and not self.held and not self.dp.held

    def clear_activity_log(self) -> None:
        """Clean shutdown: nothing in flight, so no extent needs repair next time."""
        ext = self.dp.al_hot_extents() + list(self.al_recovered)
        if ext and not self.jobs:
            for s in self.write_links:
                self._ctrl(s, wire.AL_REMOVE, payload=wire.pack_u32s(ext))
                self._ctrl(s, wire.SYNC)
            self.dp.al_clear()
        self.flush()

    def close(self) -> None:
        """Clean stop: what is queued for the replicas (the last CLEAR_DIRTY, activity-log
        removals) goes out before each connection ends with a FIN. Only failed links are
        closed abortively (_close): a clean stop has no write in flight, and a later
        frontend's generation fences anything stale anyway."""
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


def _or_into(dst: bytearray, src: bytes | bytearray) -> None:
    i = src.find(1)
    while i >= 0:
        dst[i] = 1
        i = src.find(1, i + 1)
