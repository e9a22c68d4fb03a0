"""Leader election on etcd, after etcd's concurrency.Election.

Each candidate puts a key under the election's prefix, attached to its lease; the key with
the lowest create revision leads. Campaigning waits until every older key is gone (its
owner resigned or its lease expired). The leader's key and create revision fence its
writes: `leadership.fenced(store)` is a Store whose commits apply only while that key
exists as created, so a deposed leader (lease lost, paused past its TTL) cannot write.

    lease = store.grant_lease(10)
    leadership = Election(store, "controller").campaign("node-a", lease)
    state = leadership.fenced(store)          # hand this to the controller
    ...; leadership.resign()
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from control.etcd_lease import Lease
from control.etcd_store import EtcdStore, Fence, NotLeader, prefix_end
from control.store import Listing, Op, Records, Versioned, Watch
from engine.errors import Busy
from proto.etcd import kv_pb2, rpc_pb2


@dataclass(frozen=True)
class Leader:
    key: bytes
    value: str
    create_revision: int
    lease: int


class Election:
    def __init__(self, store: EtcdStore, name: str):
        if not name or "/" in name:
            raise ValueError(f"election name {name!r}: non-empty, without '/'")
        self.store = store
        self.client = store.client
        self.prefix = store.election_prefix + name.encode() + b"/"

    def campaign(self, value: str, lease: Lease, *, timeout_s: float | None = None) -> Leadership:
        """Become leader: returns once every earlier candidate is gone. Raises Busy after
        timeout_s (withdrawing the candidacy), NotLeader if the lease is lost meanwhile."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        key = self.prefix + f"{lease.id:x}".encode()
        # create-if-absent on a key per lease: repeating it after a lost reply is harmless
        rsp = self.client.call("KV", "Txn", rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE,
                                     result=rpc_pb2.Compare.EQUAL, create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=key, value=value.encode(), lease=lease.id))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))]),
            idempotent=True)
        if rsp.succeeded:
            revision = rsp.header.revision
        else:
            revision = rsp.responses[0].response_range.kvs[0].create_revision
        leadership = Leadership(self, key, revision, lease)
        if not rsp.succeeded and rsp.responses[0].response_range.kvs[0].value != value.encode():
            leadership.proclaim(value)
        try:
            self._wait_for_older(revision, lease, deadline)
        except BaseException:
            leadership.resign()
            raise
        return leadership

    def _wait_for_older(self, revision: int, lease: Lease, deadline: float | None) -> None:
        while True:
            rsp = self.client.call("KV", "Range", rpc_pb2.RangeRequest(
                key=self.prefix, range_end=prefix_end(self.prefix), limit=1,
                sort_order=rpc_pb2.RangeRequest.DESCEND, sort_target=rpc_pb2.RangeRequest.CREATE,
                max_create_revision=revision - 1), idempotent=True)
            if not rsp.kvs:
                return
            older = rsp.kvs[0].key
            watch = self.store.watch_raw(older, b"", rsp.header.revision + 1, lambda ev: ev.type)
            try:
                while True:
                    if not lease.alive():
                        raise NotLeader("the campaign's lease was lost")
                    wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                    if wait <= 0:
                        raise Busy(f"another candidate still leads {self.prefix.decode()}")
                    if watch.get(wait) == kv_pb2.Event.DELETE:
                        break
            finally:
                watch.cancel()

    def leader(self) -> Leader | None:
        return self._leader()[0]

    def _leader(self) -> tuple[Leader | None, int]:
        rsp = self.client.call("KV", "Range", rpc_pb2.RangeRequest(
            key=self.prefix, range_end=prefix_end(self.prefix), limit=1,
            sort_order=rpc_pb2.RangeRequest.ASCEND, sort_target=rpc_pb2.RangeRequest.CREATE),
            idempotent=True)
        if not rsp.kvs:
            return None, rsp.header.revision
        kv = rsp.kvs[0]
        return Leader(kv.key, kv.value.decode(), kv.create_revision, kv.lease), rsp.header.revision

    def observe(self, current: Leader | None, timeout_s: float) -> Leader | None:
        """Wait until the leader differs from `current` (a new one, a new value, or none);
        returns the leader then, or `current` after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            leader, revision = self._leader()
            if leader != current:
                return leader
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return current
            watch = self.store.watch_raw(self.prefix, prefix_end(self.prefix), revision + 1,
                                         lambda ev: ev)
            try:
                watch.get(remaining)
            finally:
                watch.cancel()


class Leadership:
    """Held by the winner of a campaign until it resigns or its lease is lost."""

    def __init__(self, election: Election, key: bytes, create_revision: int, lease: Lease):
        self.election = election
        self.key = key
        self.create_revision = create_revision
        self.lease = lease
        self.fence = Fence(key, create_revision)

    def alive(self) -> bool:
        """The lease certainly still holds (a leader that is not alive must stop acting)."""
        return self.lease.alive()

    def proclaim(self, value: str) -> None:
        """Change the value observers see, while still leader."""
        rsp = self.election.client.call("KV", "Txn", rpc_pb2.TxnRequest(
            compare=[self._still_mine()],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=self.key, value=value.encode(), lease=self.lease.id))]), idempotent=True)
        if not rsp.succeeded:
            raise NotLeader("the leadership has ended")

    def resign(self) -> None:
        """Give up leadership (the next candidate takes over at once). Idempotent."""
        self.election.client.call("KV", "Txn", rpc_pb2.TxnRequest(
            compare=[self._still_mine()],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
                key=self.key))]), idempotent=True)

    def _still_mine(self) -> Any:
        return rpc_pb2.Compare(key=self.key, target=rpc_pb2.Compare.CREATE,
                               result=rpc_pb2.Compare.EQUAL, create_revision=self.create_revision)

    def fenced(self, store: EtcdStore) -> FencedStore:
        return FencedStore(store, self)


class FencedStore:
    """A Store whose commits apply only while the leadership lasts (else NotLeader).
    Reads and watches are the underlying store's; close() leaves that store open."""

    def __init__(self, store: EtcdStore, leadership: Leadership):
        self.store = store
        self.leadership = leadership
        self.max_ops = store.max_ops

    def get(self, key: str) -> Versioned | None:
        return self.store.get(key)

    def list(self, prefix: str = "", *, after: str = "", limit: int = 0) -> Records:
        return self.store.list(prefix, after=after, limit=limit)

    def list_with_revision(self, prefix: str = "", *, after: str = "",
                           limit: int = 0) -> Listing:
        return self.store.list_with_revision(prefix, after=after, limit=limit)

    def commit(self, ops: Sequence[Op]) -> int:
        ops = list(ops)
        if not self.leadership.alive():
            raise NotLeader("this process's leadership has lapsed (lease not renewed in time)")
        return self.store.commit(ops, fence=self.leadership.fence)

    def watch(self, prefix: str = "", start_revision: int = 0) -> Watch:
        return self.store.watch(prefix, start_revision)

    def close(self) -> None:
        pass


__all__ = ["Election", "FencedStore", "Leader", "Leadership", "NotLeader"]
