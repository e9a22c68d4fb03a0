"""Node registrations: each node process publishes itself in the cluster store under
`node/<node_id>`, attached to an etcd lease it keeps alive.

The record says where the node's agent listens and what the node offers (zone, pool
bytes, IOPS capacity, attach limit), refreshed every `refresh_s`. The lease makes
registration mean liveness: a node that dies or is cut off from etcd stops renewing, its
key vanishes with the lease, and the controllers stop offering it (its volumes read "node
X is not reachable"; deletes keep their tombstones for it). Back in touch, the node takes
a new lease and registers again.

The controllers' side is control/node_watch.py.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from control.etcd_lease import Lease
from control.etcd_store import EtcdStore
from control.node_api import Condition, NodeApi, NodeInfo
from control.store import Put
from engine.errors import EngineError

log = logging.getLogger(__name__)

NODE = "node/"
DEFAULT_TTL_S = 10
DEFAULT_REFRESH_S = 10.0


@dataclass(frozen=True)
class Registration:
    node_id: str
    zone: str
    agent_address: str  # HOST:PORT of the node agent API
    total_bytes: int
    free_bytes: int
    reserve_bytes: int
    iops_capacity: int
    max_volumes: int
    condition: Condition = Condition()
    software_version: str = ""
    updated_at: float = 0.0
    replica_address: str = ""  # HOST:PORT of its replica service ("": serves none)

    @property
    def key(self) -> str:
        return NODE + self.node_id

    def info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.zone, self.total_bytes, self.free_bytes,
                        self.reserve_bytes, self.iops_capacity, self.max_volumes,
                        self.condition, self.replica_address)

    @classmethod
    def of(cls, info: NodeInfo, agent_address: str, software_version: str,
           now: float) -> Registration:
        return cls(info.node_id, info.zone, agent_address, info.total_bytes, info.free_bytes,
                   info.reserve_bytes, info.iops_capacity, info.max_volumes, info.condition,
                   software_version, now, info.replica_address)

    def to_value(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: dict) -> Registration:
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in value.items() if k in fields}  # newer writers add fields
        known["condition"] = Condition(**known.get("condition", {}))
        return cls(**known)


class Registrar:
    """Keeps this node registered while it runs: start(), then stop() on shutdown."""

    def __init__(self, store: EtcdStore, node: NodeApi, agent_address: str,
                 software_version: str, *, ttl_s: int = DEFAULT_TTL_S,
                 refresh_s: float = DEFAULT_REFRESH_S,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.node = node
        self.agent_address = agent_address
        self.software_version = software_version
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.clock = clock
        self.lease: Lease | None = None
        self.registered = threading.Event()  # set while the record is known to be in place
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register_once(self) -> Registration:
        """Publish the node's figures now, under the current lease (a new one if it was
        lost). Raises Unavailable when etcd cannot be reached."""
        if self.lease is None or not self.lease.alive():
            if self.lease is not None:
                log.warning("registration lease %x lost; registering again", self.lease.id)
                self.lease.stop_keep_alive()
            self.registered.clear()
            self.lease = self.store.grant_lease(self.ttl_s)
        record = Registration.of(self.node.info(), self.agent_address, self.software_version,
                                 self.clock())
        self.store.commit([Put(record.key, record.to_value(), lease=self.lease.id)])
        self.registered.set()
        return record

    def start(self) -> Registration | None:
        """Register, then keep it up. When etcd cannot be reached now, returns None and
        keeps trying in the background: the node still serves its kubelet meanwhile."""
        record = None
        try:
            record = self.register_once()
            log.info("registered %s (zone %s, agent %s, lease %x, ttl %ds)", record.node_id,
                     record.zone, record.agent_address, self.lease.id if self.lease else 0,
                     self.ttl_s)
        except EngineError as e:
            log.warning("not registered yet (retrying every second): %s", e)
        self._thread = threading.Thread(target=self._loop, args=(record is not None,),
                                        name="registration", daemon=True)
        self._thread.start()
        return record

    def _loop(self, registered: bool) -> None:
        wait = self.refresh_s if registered else 1.0
        while True:
            lease = self.lease
            lost = lease.lost if lease is not None else None
            # wake early when the lease is lost, to register again at once
            deadline = time.monotonic() + wait
            while not self._stop.is_set() and time.monotonic() < deadline:
                if lost is not None and lost.is_set():
                    break
                self._stop.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            if self._stop.is_set():
                return
            try:
                self.register_once()
                wait = self.refresh_s
            except EngineError as e:  # etcd away: keep trying, quickly
                self.registered.clear()
                log.info("registration not refreshed: %s", e)
                wait = 1.0

    def stop(self, *, deregister: bool = True) -> None:
        """Stop refreshing; deregister (revoke the lease: the record goes now) unless the
        node should rather stay listed until its lease expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        lease = self.lease
        if lease is None:
            return
        if deregister:
            try:
                lease.revoke()
            except EngineError as e:
                log.info("registration lease not revoked (it expires by itself): %s", e)
        else:
            lease.stop_keep_alive()
