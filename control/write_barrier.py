"""Consistent copies of every replica of a mirrored volume: the controller's write barrier.

A snapshot (or a clone) of a mirrored volume is one copy-on-write copy per replica, made on
each replica's node; a restore from any of them must give the same image. So the copies
are made while nothing can write:

    with WriteBarrier(volumes, nodes).held(volume, token) as held:
        for node_id in held.members:        # identical replicas, reachable, in order
            nodes.require(node_id).snapshot_replica(...)
    # leaving the block checked that the barrier held the whole time (else Unavailable)

- attached to a node: that node holds the volume's writes (control/node_barrier.py: its
  filesystem frozen, then the frontend's barrier: new writes wait, those in flight drain,
  every replica syncs); the frontend names the replicas identical at that moment. A node
  that cannot be reached: Unavailable (its frontend may still be writing). Attached but not
  staged: staging waits for the barrier there.
- not attached: nothing writes; the replicas the arbiter holds in sync are identical if
  every one was closed cleanly (empty activity log), else one of them is the image (a
  frontend that died may have left a write on some replicas and not others: each alone is
  a valid crash image, together they are not).
- leaving the block resumes the writes, and fails (Unavailable, retry) if the barrier let
  go before (its deadline, a restart), or if the volume was attached meanwhile (a new
  generation in the arbiter) or a frontend started (the arbiter record changed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from control.records import VolumeRecord
from control.registry import NodeRegistry
from control.store_arbiter import StoreArbiter
from engine.errors import EngineError, NotFound, Unavailable
from mirror.arbiter import VolumeRecord as ArbiterRecord
from mirror.spec import ReplicaState

log = logging.getLogger(__name__)

HOLD_S = 20.0  # how long writes may be held at most (the frontend lets go by itself then)


@dataclass(frozen=True)
class Held:
    members: tuple[str, ...]  # replica nodes whose copies are identical now (placement order)
    consumer: str  # the node holding the writes ("": the volume is not attached)
    staged: bool  # a frontend serves the volume (and holds its writes)


class WriteBarrier:
    def __init__(self, store_arbiter: StoreArbiter, nodes: NodeRegistry,
                 attached: Callable[[str], list[str]], hold_s: float = HOLD_S):
        """attached(volume_id) -> node ids the volume is published to."""
        self.arbiter = store_arbiter
        self.nodes = nodes
        self.attached = attached
        self.hold_s = hold_s

    @contextlib.contextmanager
    def held(self, vol: VolumeRecord, token: str) -> Iterator[Held]:
        before = self._arbiter(vol.volume_id)
        consumers = list(self.attached(vol.volume_id))
        consumer = consumers[0] if consumers else ""
        barrier = None
        if consumer:
            node = self.nodes.get(consumer)
            if node is None:
                raise Unavailable(f"volume {vol.volume_id} is attached to {consumer}, which "
                                  "cannot be reached: its writes cannot be held for a "
                                  "consistent copy; retry when it is back")
            barrier = node.barrier_frontend(vol.volume_id, token, self.hold_s)
        try:
            staged = barrier is not None and barrier.running
            if staged:
                assert barrier is not None
                members = self._reachable(vol, set(barrier.replicas))
            else:
                in_sync = {n for n, st in before.replicas.items()
                           if st == ReplicaState.IN_SYNC.value}
                members = self._clean(vol, self._reachable(vol, in_sync))
            if not members:
                raise Unavailable(f"no replica of {vol.volume_id} holding a consistent copy "
                                  "can be reached now; retry")
            yield Held(tuple(members), consumer, staged)
        except BaseException:
            self._resume(vol.volume_id, consumer, token)
            raise
        held_throughout = self._resume(vol.volume_id, consumer, token)
        after = self._arbiter(vol.volume_id)
        if consumer and not held_throughout:
            raise Unavailable(f"the write barrier of {vol.volume_id} on {consumer} let go "
                              f"before every copy was made (it holds {self.hold_s:.0f} s at "
                              "most); retry")
        if after.generation != before.generation or (not staged
                                                      and after.version != before.version):
            raise Unavailable(f"volume {vol.volume_id} was attached or started serving while "
                              "its copies were made; retry")

    def _arbiter(self, volume_id: str) -> ArbiterRecord:
        try:
            return self.arbiter.get(volume_id)
        except NotFound:
            raise Unavailable(f"the arbiter record of {volume_id} is missing") from None

    def _reachable(self, vol: VolumeRecord, wanted: set[str]) -> list[str]:
        return [r.node_id for r in vol.replicas
                if r.node_id in wanted and self.nodes.get(r.node_id) is not None]

    def _clean(self, vol: VolumeRecord, members: list[str]) -> list[str]:
        """All of them when every one was closed cleanly; else the first alone."""
        present, clean = [], True
        for node_id in members:
            try:
                held = self.nodes.require(node_id).replica(vol.volume_id)
            except EngineError as e:  # no copy there either, then
                log.warning("replica of %s on %s not checked: %s", vol.volume_id, node_id, e)
                continue
            if held is None:
                log.warning("replica of %s is missing on %s", vol.volume_id, node_id)
                continue
            if held.activity_log_extents:
                log.warning("replica of %s on %s has an activity log: its last frontend did "
                            "not stop cleanly, the replicas may differ in what was in flight; "
                            "one copy only", vol.volume_id, node_id)
                clean = False
            present.append(node_id)
        return present if clean else present[:1]

    def _resume(self, volume_id: str, consumer: str, token: str) -> bool:
        if not consumer:
            return True
        node = self.nodes.get(consumer)
        if node is None:
            return False
        try:
            return node.resume_frontend(volume_id, token)
        except EngineError as e:
            log.warning("resuming the writes of %s on %s: %s (its barrier lets go by itself)",
                        volume_id, consumer, e)
            return False
