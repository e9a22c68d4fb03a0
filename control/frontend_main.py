"""A mirror frontend's data path in a cluster: the mirror worker under an etcd lease.

    python -m control.frontend_main --config STATE/frontends/<volume>/frontend.json

The mirror's worker (mirror/frontend_worker.py) with what a cluster adds, from the
config's "cluster" section:
- the arbiter is etcd (control/store_arbiter.py), through the cluster store;
- the frontend serves under an etcd lease of TTL `lease_ttl_s`, renewed in the
  background, and advertised as `frontend/<volume_id>` = {node_id, generation, state:
  "serving"} attached to the lease. Every tick the worker checks how long the lease is
  still certainly valid (counted from when the last renewal was *sent*, so never later
  than etcd's own expiry): below `fence_margin_s` it fences itself and fails every
  request. So once etcd has expired the lease (and the HA controller moves the pods),
  this frontend has already stopped writing; the new ControllerPublish fences its
  generation on the replicas besides.
- a clean stop writes state "stopped" (without the lease) before revoking it, so the HA
  controller can tell a frontend that stopped from one that died. A crash leaves the
  lease to expire on its own: the agent restarts the worker, which takes a lease of its
  own and says "serving" again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from control.store import Put
from control.store_arbiter import StoreArbiter
from control.stores import StoreSpec, open_store
from engine.errors import EngineError
from mirror import netns
from mirror.core import MirrorCore
from mirror.frontend_worker import Worker, load_config

log = logging.getLogger("tandem.frontend")
FRONTEND = "frontend/"
REPORT_EVERY_S = 2.0  # while a replica resyncs: its progress, for the volume's condition


class StatusReporter:
    """The worker's Reporter: the replicas' states (and a resync's progress) go into the
    volume's `frontend/<volume_id>` record, under the frontend's lease, when they change
    and every REPORT_EVERY_S while a replica resyncs. The store is written from a thread
    of its own: the data path never waits for etcd."""

    def __init__(self, store, key: str, record: dict, lease_id: int):
        self.store, self.key, self.record, self.lease_id = store, key, record, lease_id
        self._shape: tuple = ()
        self._looked = self._sent = 0.0
        self._pending: dict | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="status-report")
        self._thread.start()

    def tick(self, core: MirrorCore) -> None:
        now = time.monotonic()
        if now - self._looked < 0.25:
            return
        self._looked = now
        states = core.status()
        shape = tuple((s.replica_id, s.state.value, s.connected) for s in states)
        resyncing = any(s.resync_total_bytes for s in states)
        if shape == self._shape and not (resyncing and now - self._sent >= REPORT_EVERY_S):
            return
        self._shape, self._sent = shape, now
        replicas = {s.replica_id: {"state": s.state.value, "connected": s.connected,
                                   "resync_done_bytes": s.resync_done_bytes,
                                   "resync_total_bytes": s.resync_total_bytes}
                    for s in states}
        with self._cond:
            self._pending = {**self.record, "replicas": replicas, "reported": time.time()}
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                value, self._pending = self._pending, None
            try:
                self.store.commit([Put(self.key, value, lease=self.lease_id)])
            except EngineError as e:  # the next change or round says it again
                log.warning("replica states not reported: %s", e)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify()
        self._thread.join(timeout=10)


class LeaseGuard:
    """The worker's Guard: serving is allowed while the lease is certainly valid for
    more than the margin."""

    def __init__(self, lease, margin_s: float):
        self.lease = lease
        self.margin_s = margin_s

    def check(self) -> str:
        remaining = self.lease.remaining_s()
        if remaining > self.margin_s:
            return ""
        return (f"its etcd lease is certainly valid for only {remaining:.1f} s more (margin "
                f"{self.margin_s} s): self-fenced before etcd can expire it")


def frontend_key(volume_id: str) -> str:
    return FRONTEND + volume_id


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s frontend %(levelname)s %(name)s %(message)s")
    cfg = load_config(args.config)
    with open(args.config) as f:
        cluster = json.load(f)["cluster"]
    if cfg.netns:
        netns.enter(cfg.netns)  # before any thread (gRPC's included): setns is per thread
    store = open_store(StoreSpec(cluster["store_url"], cluster.get("store_ca", ""),
                                 cluster.get("store_cert", ""), cluster.get("store_key", ""),
                                 float(cluster.get("store_timeout_s", 5.0)),
                                 cluster.get("store_namespace", "/tandem/")))
    ttl = int(cluster.get("lease_ttl_s", 10))
    margin = float(cluster.get("fence_margin_s", 3.0))
    lease = store.grant_lease(ttl)  # type: ignore[attr-defined]  # etcd only
    record = {"node_id": cluster["node_id"], "generation": cfg.generation,
              "state": "serving", "since": time.time(), "pid": os.getpid()}
    store.commit([Put(frontend_key(cfg.volume_id), record, lease=lease.id)])
    # A crash leaves the lease to expire on its own (a restarted worker takes over with a
    # lease of its own meanwhile); only a clean stop says so and gives the lease back.
    reporter = StatusReporter(store, frontend_key(cfg.volume_id), record, lease.id)
    try:
        Worker(cfg, StoreArbiter(store), LeaseGuard(lease, margin), reporter).run()
    finally:
        reporter.close()
    store.commit([Put(frontend_key(cfg.volume_id),
                      {**record, "state": "stopped", "since": time.time()})])
    lease.revoke()
    store.close()


if __name__ == "__main__":
    main()
