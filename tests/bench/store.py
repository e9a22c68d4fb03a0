"""Cluster store micro-benchmark: commits per second of single-key create-if-absent
(`commit([Put(key, value, expect=0)])`, a new key each time) from 1, 8 and 32 threads,
on the SQLite store (group commit, synchronous=FULL) and on a one-member etcd on loopback
(fsync on). Prints one line per run, then a JSON line with every figure.

    python -m tests.bench.store [--seconds 3]

Runtime: about 6 x --seconds plus ~2 s (etcd start), ~20 s by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
import uuid

from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore
from control.sqlite_store import SqliteStore
from control.store import Put, Store
from tests.etcd_cluster import EtcdCluster
from tests.support import cleanup_tree

THREADS = (1, 8, 32)
VALUE = {"name": "pvc-0123456789", "size_bytes": 1 << 30, "node": "node-a", "zone": "zone-a",
         "tier": "standard", "state": "creating"}


def commits_per_second(store: Store, threads: int, seconds: float) -> float:
    tag = uuid.uuid4().hex[:8]
    counter = itertools.count()
    stop = time.monotonic() + seconds
    done = [0] * threads

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            store.commit([Put(f"volume/{tag}-{next(counter)}", VALUE, expect=0)])
            done[i] += 1

    began = time.monotonic()
    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done) / (time.monotonic() - began)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    results: dict[str, float] = {}
    root = tempfile.mkdtemp(prefix="tdm-bench-store-", dir="/tmp")
    try:
        sqlite = SqliteStore(f"{root}/cluster.sqlite")
        for n in THREADS:
            before = (sqlite.commits, sqlite.groups)
            results[f"sqlite_commits_per_s_{n}"] = rate = commits_per_second(sqlite, n,
                                                                             args.seconds)
            per_group = (sqlite.commits - before[0]) / max(1, sqlite.groups - before[1])
            results[f"sqlite_commits_per_fsync_{n}"] = round(per_group, 1)
            print(f"sqlite  {n:2d} threads: {rate:8.0f} commits/s ({per_group:.1f} per fsync)")
        sqlite.close()
        with EtcdCluster(root, size=1) as cluster:
            store = EtcdStore(EtcdConfig.from_url(cluster.url))
            for n in THREADS:
                results[f"etcd_commits_per_s_{n}"] = rate = commits_per_second(store, n,
                                                                               args.seconds)
                print(f"etcd    {n:2d} threads: {rate:8.0f} commits/s")
            store.close()
    finally:
        cleanup_tree(root)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
