"""The cluster store on etcd v3 (control.store.Store), for cluster mode.

Keys live under the configured namespace: record "volume/vol-a" is etcd key
"/tandem/kv/volume/vol-a". A record's version is its etcd mod_revision; a commit is one
etcd Txn (guards are compares on mod_revision, 0 meaning absent).

Unknown outcomes. A write whose reply is lost (timeout, connection reset, leader change)
may or may not have been applied, and may even still be in flight inside the cluster.
Every writing commit therefore also compares and rewrites a commit-token key of its own
(a "slot": /tandem/txn/<client id>/<n>, one per concurrent commit of this client) with a
token unique to the attempt. When the reply is lost, the store writes a fence to the slot,
guarded by the slot's last known revision:
- the fence applies: the commit did not, and never can (its compare on the slot now
  fails), so it is sent again;
- the fence's guard fails: the slot holds the commit's token, so the commit applied (at
  the slot's mod_revision), and that revision is returned.
Only when no member answers within the timeout does the caller get OutcomeUnknown (an
Unavailable): the commit may still apply later, and the slot is retired. Slot keys are
deleted by close(); a crashed client leaves at most one small key per concurrent commit.

Watches follow etcd: a watch that starts before the compacted revision, or falls behind
it, ends with Compacted (re-list, watch from the listing's revision + 1). A watch moves
to another member by itself when its member fails, resuming after the last event.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from control.etcd_client import EtcdClient, EtcdConfig, EtcdRejected, MaybeApplied, open_requests
from control.etcd_lease import Lease
from control.store import (
    RESERVED_OPS,
    Compacted,
    Conflict,
    Delete,
    Event,
    Listing,
    Op,
    OutcomeUnknown,
    Put,
    Records,
    Unavailable,
    Versioned,
    Watch,
    decode,
    encode,
    is_write,
    validate_ops,
)
from proto.etcd import kv_pb2, rpc_pb2


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix" (b"\\0": to the end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class Fence:
    """A guard that the leader key still exists as created (control.election): a commit
    carrying it applies only while that leadership lasts."""

    key: bytes
    create_revision: int


class NotLeader(Unavailable):
    """The commit was fenced by a leadership that has ended: nothing was written."""


@dataclass
class _Slot:
    key: bytes
    mod_revision: int = 0  # 0: the key does not exist yet


class EtcdStore:
    """control.store.Store on etcd. Thread-safe; share one per process."""

    def __init__(self, config: EtcdConfig, *, client: EtcdClient | None = None):
        self.config = config
        self.client = client or EtcdClient(config)
        self.max_ops = config.max_txn_ops - RESERVED_OPS
        ns = config.namespace.encode()
        self._data = ns + b"kv/"
        self._slot_prefix = ns + b"txn/" + uuid.uuid4().hex.encode() + b"/"
        self.election_prefix = ns + b"election/"
        self._slots: list[_Slot] = []
        self._slot_count = 0
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._closers: list[Callable[[], None]] = []
        self._closed = False

    # -- keys ------------------------------------------------------------------------------
    def _raw(self, key: str) -> bytes:
        return self._data + key.encode()

    def _key(self, raw: bytes) -> str:
        return raw[len(self._data):].decode()

    # -- reads ---------------------------------------------------------------------------------
    def get(self, key: str) -> Versioned | None:
        rsp = self.client.call("KV", "Range", rpc_pb2.RangeRequest(key=self._raw(key)),
                               idempotent=True)
        if not rsp.kvs:
            return None
        kv = rsp.kvs[0]
        return Versioned(decode(kv.value), kv.mod_revision)

    def list(self, prefix: str = "", *, after: str = "", limit: int = 0) -> Records:
        return self.list_with_revision(prefix, after=after, limit=limit).items

    def list_with_revision(self, prefix: str = "", *, after: str = "",
                           limit: int = 0) -> Listing:
        start = self._raw(prefix) if prefix else self._data
        if after:
            start = max(start, self._raw(after) + b"\0")
        rsp = self.client.call("KV", "Range", rpc_pb2.RangeRequest(
            key=start, range_end=prefix_end(self._raw(prefix) if prefix else self._data),
            limit=max(limit, 0)), idempotent=True)
        items = [(self._key(kv.key), Versioned(decode(kv.value), kv.mod_revision))
                 for kv in rsp.kvs]
        return Listing(items, rsp.header.revision)

    def revision(self) -> int:
        """The store's current revision."""
        rsp = self.client.call("KV", "Range", rpc_pb2.RangeRequest(
            key=self._data, range_end=prefix_end(self._data), count_only=True), idempotent=True)
        return int(rsp.header.revision)

    # -- writes --------------------------------------------------------------------------------
    def commit(self, ops: Sequence[Op], *, fence: Fence | None = None) -> int:
        """Apply ops all or none (see control.store). With a fence, only while the
        leadership it names lasts (else NotLeader)."""
        ops = validate_ops(ops, self.max_ops)
        deadline = self.client.deadline()
        try:
            if not any(is_write(op) for op in ops):  # guards only: a read, safe to repeat
                rsp = self.client.call("KV", "Txn", self._request(ops, fence),
                                       idempotent=True, deadline=deadline)
                if not rsp.succeeded:
                    self._raise_failure(rsp, ops, fence, None)
                return int(rsp.header.revision)
            slot = self._take_slot()
            try:
                revision = self._commit_with_token(slot, ops, fence, deadline)
            except OutcomeUnknown:
                raise  # the slot is retired: the commit may still land on it
            except BaseException:
                self._give_slot(slot)
                raise
            self._give_slot(slot)
            return revision
        except EtcdRejected as e:  # validate_ops lets nothing through that etcd refuses
            raise ValueError(str(e)) from None

    def _commit_with_token(self, slot: _Slot, ops: Sequence[Op], fence: Fence | None,
                           deadline: float) -> int:
        refreshed = False
        while True:
            token = b"commit-" + uuid.uuid4().hex.encode()
            try:
                rsp = self.client.call("KV", "Txn", self._request(ops, fence, slot, token),
                                       idempotent=False, deadline=deadline)
            except MaybeApplied as lost:
                applied = self._resolve(slot, token, lost, ops, deadline)
                if applied:
                    return applied
                if time.monotonic() >= deadline:
                    raise Unavailable(f"commit of {_keys(ops)} not applied: etcd did not "
                                      f"answer in time ({lost})") from None
                continue  # fenced off: it can never apply; send it again
            if rsp.succeeded:
                slot.mod_revision = rsp.header.revision
                return int(rsp.header.revision)
            self._raise_failure(rsp, ops, fence, slot)
            # only our slot's guard failed: our note of its revision was behind
            if refreshed:
                raise RuntimeError(f"commit token key {slot.key!r} keeps changing: another "
                                   "client writes under this client's id")
            refreshed = True

    def _request(self, ops: Sequence[Op], fence: Fence | None, slot: _Slot | None = None,
                 token: bytes = b"") -> Any:
        """The Txn for a commit: its guards (plus the fence's and the slot's), its writes
        (plus the token), and on failure a read of every key guarded, to name conflicts."""
        compares = [_mod_equal(self._raw(op.key), op.expect) for op in ops
                    if op.expect is not None]
        success = [self._write(op) for op in ops if is_write(op)]
        failure = [_range(self._raw(op.key)) for op in ops if op.expect is not None]
        if fence is not None:
            compares.append(rpc_pb2.Compare(key=fence.key, target=rpc_pb2.Compare.CREATE,
                                            result=rpc_pb2.Compare.EQUAL,
                                            create_revision=fence.create_revision))
            failure.append(_range(fence.key))
        if slot is not None:
            compares.append(_mod_equal(slot.key, slot.mod_revision))
            success.append(_put(slot.key, token))
            failure.append(_range(slot.key))
        return rpc_pb2.TxnRequest(compare=compares, success=success, failure=failure)

    def _resolve(self, slot: _Slot, token: bytes, lost: Exception, ops: Sequence[Op],
                 deadline: float) -> int:
        """Learn whether the commit carrying `token` applied: its revision, or 0 after
        fencing it off for good. Raises OutcomeUnknown when etcd cannot be reached."""
        fence_token = b"fence-" + uuid.uuid4().hex.encode()
        txn = rpc_pb2.TxnRequest(
            compare=[_mod_equal(slot.key, slot.mod_revision)],
            success=[_put(slot.key, fence_token)],
            failure=[_range(slot.key)])
        # resolution gets at least one attempt's time even when the commit used the rest
        deadline = max(deadline, time.monotonic() + self.config.attempt_timeout_s)
        last: Exception = lost
        while time.monotonic() < deadline:
            try:
                rsp = self.client.call("KV", "Txn", txn, idempotent=False, deadline=deadline)
            except (MaybeApplied, Unavailable) as e:
                last = e  # the fence's own outcome is unknown: the next try tells
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            if rsp.succeeded:
                slot.mod_revision = rsp.header.revision
                return 0
            kvs = rsp.responses[0].response_range.kvs
            value = kvs[0].value if kvs else b""
            if value == token:
                slot.mod_revision = kvs[0].mod_revision
                return int(kvs[0].mod_revision)
            if value == fence_token:  # an earlier fence of ours applied, its reply was lost
                slot.mod_revision = kvs[0].mod_revision
                return 0
            raise RuntimeError(f"commit token key {slot.key!r} holds {value!r}: "
                               "another client writes under this client's id")
        raise OutcomeUnknown(
            f"commit of {_keys(ops)}: outcome unknown (it may still apply): no etcd member "
            f"answered within {self.config.timeout_s:g}s ({last})")

    def _raise_failure(self, rsp: Any, ops: Sequence[Op], fence: Fence | None,
                       slot: _Slot | None) -> None:
        """Raise for a failed guard (Conflict or NotLeader); return if only the slot's
        guard failed (its revision is refreshed)."""
        reads = iter(rsp.responses)
        conflicts = []
        for op in ops:
            if op.expect is None:
                continue
            kvs = next(reads).response_range.kvs
            if (kvs[0].mod_revision if kvs else 0) != op.expect:
                conflicts.append(op.key)
        if fence is not None:
            kvs = next(reads).response_range.kvs
            if not kvs or kvs[0].create_revision != fence.create_revision:
                raise NotLeader("the leadership that fenced this commit has ended; "
                                "nothing was written")
        if conflicts:
            raise Conflict(conflicts)
        if slot is None:
            raise RuntimeError("etcd failed a transaction whose guards all held")
        kvs = next(reads).response_range.kvs
        slot.mod_revision = kvs[0].mod_revision if kvs else 0

    def _write(self, op: Op) -> Any:
        if isinstance(op, Put):
            return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=self._raw(op.key), value=encode(op.value).encode(), lease=op.lease))
        assert isinstance(op, Delete)
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
            key=self._raw(op.key)))

    def _take_slot(self) -> _Slot:
        with self._lock:
            if self._slots:
                return self._slots.pop()
            self._slot_count += 1
            return _Slot(self._slot_prefix + str(self._slot_count).encode())

    def _give_slot(self, slot: _Slot) -> None:
        with self._lock:
            self._slots.append(slot)

    # -- watches -------------------------------------------------------------------------------
    def watch(self, prefix: str = "", start_revision: int = 0) -> Watch:
        """Events of keys starting with prefix, from start_revision (0: from now on)."""
        raw = self._raw(prefix) if prefix else self._data
        if start_revision <= 0:
            # "now" is the revision when watch() was called, not whenever etcd gets to
            # creating the watch: a commit made right after watch() returns is seen
            start_revision = self.revision() + 1

        def convert(ev: Any) -> Event:
            key = self._key(ev.kv.key)
            if ev.type == kv_pb2.Event.DELETE:
                return Event(key, None, ev.kv.mod_revision)
            return Event(key, Versioned(decode(ev.kv.value), ev.kv.mod_revision),
                         ev.kv.mod_revision)

        return self.watch_raw(raw, prefix_end(raw), start_revision, convert)

    def watch_raw(self, key: bytes, range_end: bytes, start_revision: int,
                  convert: Callable[[Any], Any]) -> Watch:
        """A watch on raw etcd keys; convert turns each mvccpb.Event into what is pushed."""
        runner = _WatchRunner(self.client, key, range_end, start_revision, convert,
                              forget=self._forget_watch)
        with self._lock:
            if self._closed:
                raise Unavailable("the cluster store is closed")
            self._watches.add(runner.watch)
        runner.start()
        return runner.watch

    def _forget_watch(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    # -- maintenance ---------------------------------------------------------------------------
    def compact(self, revision: int) -> None:
        """Drop history before `revision` (watches that need it end with Compacted)."""
        self.client.call("KV", "Compact", rpc_pb2.CompactionRequest(
            revision=revision, physical=True), idempotent=True)

    # -- leases (cluster mode; not part of the Store contract) -------------------------------------
    def grant_lease(self, ttl_s: int, *, keep_alive: bool = True,
                    persistent: bool = False) -> Lease:
        """A new lease, kept alive in the background unless told otherwise. Keys put with
        Put(..., lease=lease.id) vanish when it expires. persistent: renewal goes on after
        the lease's local validity ran out, until etcd says it is gone (control/etcd_lease.py)."""
        lease = Lease.grant(self.client, ttl_s, persistent=persistent)
        if keep_alive:
            lease.start_keep_alive()
        with self._lock:
            self._closers.append(lease.stop_keep_alive)
        return lease

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches, closers = list(self._watches), list(self._closers)
        for w in watches:
            w.fail(Unavailable("the cluster store was closed"))
            w.cancel()
        for close in closers:
            close()
        with contextlib.suppress(Exception):  # best effort: a crash would leave them too
            self.client.call("KV", "DeleteRange", rpc_pb2.DeleteRangeRequest(
                key=self._slot_prefix, range_end=prefix_end(self._slot_prefix)),
                idempotent=True, deadline=time.monotonic() + self.config.attempt_timeout_s)
        self.client.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WatchRunner:
    """Feeds a Watch from an etcd watch stream, moving to another member when its member
    fails and resuming after the last event seen."""

    def __init__(self, client: EtcdClient, key: bytes, range_end: bytes, start_revision: int,
                 convert: Callable[[Any], Any], forget: Callable[[Watch], None]):
        self.client = client
        self.key, self.range_end = key, range_end
        self.next_revision = start_revision  # 0: from now on
        self.convert = convert
        self.forget = forget
        self.watch = Watch(on_cancel=self._cancel)
        self._lock = threading.Lock()
        self._call: Any = None
        self._stop_stream: threading.Event | None = None
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _cancel(self) -> None:
        with self._lock:
            call, stop = self._call, self._stop_stream
        if stop is not None:
            stop.set()
        if call is not None:
            call.cancel()
        self.forget(self.watch)

    def _run(self) -> None:
        pause = 0.05
        while not self.watch.finished:
            stop = threading.Event()
            request = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=self.key, range_end=self.range_end, start_revision=self.next_revision))
            try:
                endpoint, call = self.client.stream("Watch", "Watch", open_requests(request, stop))
            except Unavailable as e:
                self.watch.fail(e)
                break
            with self._lock:
                self._call, self._stop_stream = call, stop
            if self.watch.finished:  # cancelled while we connected
                stop.set()
                call.cancel()
                break
            try:
                if self._consume(call):
                    break
                pause = 0.05
            except grpc.RpcError:
                if self.watch.finished:
                    break
                self.client.rotate(endpoint)
            finally:
                stop.set()
                call.cancel()
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self.forget(self.watch)

    def _consume(self, call: Any) -> bool:
        """Push the stream's events; True when the watch has ended."""
        for rsp in call:
            if rsp.compact_revision:
                self.watch.fail(Compacted(int(rsp.compact_revision)))
                return True
            if rsp.canceled:
                self.watch.fail(Unavailable(f"etcd cancelled the watch: {rsp.cancel_reason}"))
                return True
            if rsp.created and self.next_revision == 0:
                self.next_revision = rsp.header.revision + 1
            for ev in rsp.events:
                self.watch.push(self.convert(ev))
                self.next_revision = ev.kv.mod_revision + 1
        return self.watch.finished


def _mod_equal(key: bytes, revision: int) -> Any:
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                           mod_revision=revision)


def _put(key: bytes, value: bytes) -> Any:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))


def _range(key: bytes) -> Any:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))


def _keys(ops: Sequence[Op]) -> str:
    keys = [op.key for op in ops if is_write(op)]
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


__all__ = ["EtcdConfig", "EtcdStore", "Fence", "NotLeader", "prefix_end"]
