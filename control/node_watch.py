"""The controller's view of the nodes: the NodeRegistry filled from the node registrations
in the cluster store (control/registration.py), kept current by a watch.

A registration that appears adds the node (a client of its agent, made by `connect`)
with the figures it published; a newer one updates the figures, or replaces the client
when the agent moved; one that vanishes (lease expired or revoked) removes the node. A
replaced or removed client is closed a while later, so calls in flight on it finish.

The watch makes changes show at once; a full listing every `relist_s` bounds how stale
the view can get when it does not: a watch stream to a member that was cut off silently
stays open and quiet until gRPC's keep-alive gives up on it (10 to 15 s), while a listing
is a linearizable read that moves to a member that answers. The watch then restarts from
the listing.

    watch = NodeWatch(store, registry, lambda reg: AgentClient(reg.node_id,
                                                               reg.agent_address, tls))
    watch.start()   # returns once the registry holds every node registered now
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from control.node_api import NodeApi
from control.registration import NODE, Registration
from control.registry import NodeRegistry
from control.store import Compacted, Store, Watch
from engine.errors import Unavailable

log = logging.getLogger(__name__)

RETIRE_AFTER_S = 60.0  # a replaced client's calls in flight have finished by then
RELIST_S = 5.0


class NodeWatch:
    def __init__(self, store: Store, registry: NodeRegistry,
                 connect: Callable[[Registration], NodeApi], *, relist_s: float = RELIST_S):
        self.store = store
        self.registry = registry
        self.connect = connect
        self.relist_s = relist_s
        self.addresses: dict[str, str] = {}  # node_id -> agent address of its client
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        revision = self._load()
        self._thread = threading.Thread(target=self._loop, args=(revision,), daemon=True,
                                        name="node-watch")
        self._thread.start()

    def _load(self) -> int:
        """Every registration now (those gone since the last listing are removed)."""
        listing = self.store.list_with_revision(NODE)
        present = set()
        for _, got in listing.items:
            reg = Registration.from_value(got.value)
            present.add(reg.node_id)
            self._apply(reg)
        for node_id in set(self.addresses) - present:
            self._drop(node_id)
        return listing.revision

    def _apply(self, reg: Registration) -> None:
        with self._lock:
            if self.addresses.get(reg.node_id) == reg.agent_address \
                    and self.registry.known(reg.node_id):
                self.registry.set_registered(reg.info())
                return
            old = self.registry.get(reg.node_id)
            self.registry.add(self.connect(reg), reg.info())
            self.addresses[reg.node_id] = reg.agent_address
        if old is not None:
            _retire(old)
        log.info("node %s (zone %s) registered, agent at %s", reg.node_id, reg.zone,
                 reg.agent_address)

    def _drop(self, node_id: str) -> None:
        with self._lock:
            self.addresses.pop(node_id, None)
            old = self.registry.remove(node_id)
        if old is not None:
            log.warning("node %s is gone (its registration expired or was withdrawn)",
                        node_id)
            _retire(old)

    def _loop(self, revision: int) -> None:
        start = revision
        while not self._closed.is_set():
            try:
                start = self._follow(start)
            except Compacted:
                start = self._reload()
            except Unavailable as e:
                if self._closed.wait(1.0):
                    return
                log.info("node watch interrupted (%s); resuming", e)

    def _follow(self, start: int) -> int:
        """Apply the watch's events until the next listing is due; returns the revision
        to watch from next."""
        watch = self._watch = self.store.watch(NODE, start_revision=start + 1)
        try:
            relist_at = time.monotonic() + self.relist_s
            while not self._closed.is_set():
                event = watch.get(max(0.05, relist_at - time.monotonic()))
                if event is not None:
                    node_id = event.key[len(NODE):]
                    if event.value is None:
                        self._drop(node_id)
                    else:
                        self._apply(Registration.from_value(event.value.value))
                    start = event.revision
                elif watch.finished:
                    break
                elif time.monotonic() >= relist_at:
                    return self._load()
            return start
        finally:
            watch.cancel()

    def _reload(self) -> int:
        while not self._closed.is_set():
            try:
                return self._load()
            except Unavailable as e:
                log.info("node list failed (%s); retrying", e)
                self._closed.wait(1.0)
        return 0

    def close(self) -> None:
        self._closed.set()
        if self._watch is not None:
            self._watch.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _retire(node: Any) -> None:
    close = getattr(node, "close", None)
    if close is not None:
        timer = threading.Timer(RETIRE_AFTER_S, close)
        timer.daemon = True
        timer.start()
