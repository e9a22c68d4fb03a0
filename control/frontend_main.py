"""A mirror frontend's data path in a cluster: the mirror worker under an etcd lease.

    python -m control.frontend_main --config STATE/frontends/<volume>/frontend.json

The mirror's worker (mirror/frontend_worker.py) with what a cluster adds, from the
config's "cluster" section:
- the arbiter is etcd (control/store_arbiter.py), through the cluster store;
- the frontend serves under a persistent etcd lease of TTL `lease_ttl_s`, renewed in the
  background (control/etcd_lease.py), and advertised as `frontend/<volume_id>` =
  {node_id, generation, state: "serving"} attached to the lease. Every tick the worker
  asks its LeaseGuard whether it may serve (the rule and why it is safe:
  docs/cluster-internals.md, "Self-fencing"): while the lease is certainly valid for more
  than `fence_margin_s` (counted from when the last renewal was *sent*, so never later
  than etcd's own expiry), yes; when it is not, only while enough in-sync replicas
  answer at this frontend's generation to rule out a takeover (etcd lost its quorum, the
  volume's I/O goes on); once etcd says the lease is gone, never again. Otherwise it
  fences itself and fails every request: a frontend cut off from etcd and from the other
  zones stops before etcd can expire its lease and the HA controller moves the pods.
- a change the arbiter must record waits at most TTL - margin (what a lease renewed that
  moment would have allowed); then I/O fails until etcd records it.
- a clean stop writes state "stopped" (without the lease) before revoking it, so the HA
  controller can tell a frontend that stopped from one that died. A crash leaves the
  lease to expire on its own: the agent restarts the worker, which takes a lease of its
  own and says "serving" again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time

from control.etcd_lease import Lease
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
    """The worker's Guard. Serving is allowed
    - while the lease is certainly valid for more than the margin;
    - else, unless etcd said the lease is gone, while the core proves (answers to probes
      sent within the last `proof_window_s`) that no newer frontend can serve
      (MirrorCore.proof_of_ownership);
    - never once etcd said the lease is gone (the HA controller may be moving the pods).
    """

    def __init__(self, lease: Lease, margin_s: float, proof_window_s: float):
        self.lease = lease
        self.margin_s = margin_s
        self.proof_window_s = proof_window_s  # <= 0: the lease alone decides
        self.on_replicas_word = False

    def check(self, core: MirrorCore) -> str:
        if self.lease.gone.is_set():
            return "etcd says its lease is gone: the volume may be moving to another node"
        remaining = self.lease.remaining_s()
        if remaining > self.margin_s:
            if self.on_replicas_word:
                self.on_replicas_word = False
                log.warning("etcd renewed the lease again: serving under it")
            return ""
        if self.proof_window_s <= 0:
            return (f"its etcd lease is certainly valid for only {remaining:.1f} s more "
                    f"(margin {self.margin_s:g} s): self-fenced before etcd can expire it")
        proven, needed = core.proof_of_ownership(time.monotonic() - self.proof_window_s)
        if proven >= needed:
            if not self.on_replicas_word:
                self.on_replicas_word = True
                log.warning("no lease renewal got through for %.1f s: serving on the word of "
                            "%d in-sync replicas at this generation (%d rule out a takeover)",
                            self.lease.ttl_s - remaining, proven, needed)
            return ""
        return (f"its etcd lease is certainly valid for only {remaining:.1f} s more (margin "
                f"{self.margin_s:g} s) and only {proven} in-sync replicas answered at its "
                f"generation within {self.proof_window_s:g} s ({needed} rule out a takeover): "
                "self-fenced before etcd can expire the lease")


def proof_window(ttl_s: float, margin_s: float, renew_period_s: float) -> float:
    """How old a replica's answer may be while the frontend serves on the replicas' word.

    A frontend cut off at time p from etcd and from the other zones sent its last renewal
    that got through at s >= p - 2 * renew_period_s (a renewal goes every period and waits
    at most a period), so etcd cannot expire its lease before s + TTL. The other zones'
    answers stop at p and stop counting at p + window <= s + TTL - margin: it fences no
    later than the lease alone would have made it. (A renewal also gets through within
    about two periods of etcd regaining its quorum, whose new leader gives the lease its
    full TTL again.) <= 0: the lease alone decides.
    """
    return ttl_s - margin_s - 2 * renew_period_s


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
    lease = store.grant_lease(ttl, persistent=True)  # type: ignore[attr-defined]  # etcd only
    window = proof_window(lease.ttl_s, margin, lease.renew_period_s)
    probe = min(0.5, window / 4) if window > 0 else 0.0
    if window <= 0:
        log.warning("lease TTL %d s, margin %g s: too short to serve on the replicas' word "
                    "while etcd is unreachable (the lease alone decides)", ttl, margin)
    cfg = dataclasses.replace(cfg, tuning=dataclasses.replace(
        cfg.tuning, probe_interval_s=probe, arbiter_wait_s=max(0.1, lease.ttl_s - margin)))
    record = {"node_id": cluster["node_id"], "generation": cfg.generation,
              "state": "serving", "since": time.time(), "pid": os.getpid()}
    store.commit([Put(frontend_key(cfg.volume_id), record, lease=lease.id)])
    # A crash leaves the lease to expire on its own (a restarted worker takes over with a
    # lease of its own meanwhile); only a clean stop says so and gives the lease back.
    reporter = StatusReporter(store, frontend_key(cfg.volume_id), record, lease.id)
    try:
        Worker(cfg, StoreArbiter(store), LeaseGuard(lease, margin, window), reporter).run()
    finally:
        reporter.close()
    store.commit([Put(frontend_key(cfg.volume_id),
                      {**record, "state": "stopped", "since": time.time()})])
    lease.revoke()
    store.close()


if __name__ == "__main__":
    main()
