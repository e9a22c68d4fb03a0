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
import time

from control.store import Put
from control.store_arbiter import StoreArbiter
from control.stores import StoreSpec, open_store
from mirror import netns
from mirror.frontend_worker import Worker, load_config

log = logging.getLogger("tandem.frontend")
FRONTEND = "frontend/"


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
    Worker(cfg, StoreArbiter(store), LeaseGuard(lease, margin)).run()
    store.commit([Put(frontend_key(cfg.volume_id),
                      {**record, "state": "stopped", "since": time.time()})])
    lease.revoke()
    store.close()


if __name__ == "__main__":
    main()
