"""Control-path benchmark: CreateVolume+DeleteVolume pairs per second, side by side.

Runs, in one run and with one client: Tandem (the real driver as a process on a private
pool) on its embedded SQLite store, Tandem on etcd (one member started here on
loopback), and the reference, csi-driver-host-path v1.18.0's `hostpathplugin`, whose
path comes from TANDEM_BENCH_HOSTPATH (built by hand from a fetched copy; never part of
this repository). Beside them, the Python floor: tests/bench/noop_csi.py, a controller
whose handlers do nothing, served with the driver's executor (what any Python driver pays
for gRPC alone; `over_python_floor_*` is the share of it Tandem reaches). Each is driven
over its unix socket by 1, 8 and 32 concurrent clients (one gRPC channel per client, as
sidecars have); ratios are taken within the run. Also:
Tandem's CPU seconds per pair (the driver process's user+system time during the 8-client
phase over the pairs it made), its RSS holding 1,000 volumes, and listing them.

    TANDEM_BENCH_HOSTPATH=/path/to/hostpathplugin python -m tests.bench.control \\
        [--seconds 5] [--volumes 1000] [--stores sqlite,etcd]

Runtime: about (3 phases x --seconds) per driver plus start-ups and the 1,000-volume
fill: ~1.5 minutes with the defaults. The final line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc

from proto import csi_pb2, csi_pb2_grpc
from tests import support
from tests.etcd_cluster import EtcdCluster
from tests.integration.helpers import create_request

CLIENTS = (1, 8, 32)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(clients: int, seconds: float, work) -> int:
    """Run work(i, n) in `clients` threads for `seconds`; returns how many completed."""
    stop = time.monotonic() + seconds
    counter = itertools.count()
    done: list[int] = []

    def loop(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            work(i, next(counter))
            n += 1
        done.append(n)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def wait_socket(endpoint: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(endpoint) as ch:
                csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=1)
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise TimeoutError(f"{endpoint} did not answer in {timeout_s}s")


def measure_pairs(endpoint: str, seconds: float, pid: int | None) -> dict[str, float]:
    """Pairs/s at 1, 8, 32 clients against the driver at endpoint (+ CPU/pair at 8)."""
    channels = [grpc.insecure_channel(endpoint) for _ in range(max(CLIENTS))]
    stubs = [csi_pb2_grpc.ControllerStub(ch) for ch in channels]
    tag = uuid.uuid4().hex[:8]

    def create_delete(i: int, n: int) -> None:
        vol = stubs[i].CreateVolume(create_request(f"bench-{tag}-{n}", size=1 << 30)).volume
        stubs[i].DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))

    out: dict[str, float] = {}
    try:
        run_clients(4, 1.0, create_delete)  # warm up: connections, caches, first commits
        for clients in CLIENTS:
            before = cpu_s(pid) if pid else 0.0
            n = run_clients(clients, seconds, create_delete)
            out[f"c{clients}"] = round(n / seconds, 1)
            if pid and clients == 8:
                out["cpu_s_per_pair"] = round((cpu_s(pid) - before) / max(n, 1), 5)
    finally:
        for ch in channels:
            ch.close()
    return out


def tandem(root: str, seconds: float, volumes: int, store_args: list[str]) -> dict[str, float]:
    os.makedirs(root)
    proc = support.DriverProcess(
        root, extra=["--pool-size-gib", "200", "--log-level", "WARNING", *store_args])
    try:
        proc.start()
        pid = proc.proc.pid
        result = measure_pairs(proc.endpoint, seconds, pid)
        if volumes:
            result.update(fill_and_list(proc, volumes))
        return result
    finally:
        proc.stop(signal.SIGTERM)


def fill_and_list(proc: support.DriverProcess, volumes: int) -> dict[str, float]:
    channels = [proc.stubs() for _ in range(8)]
    tag = uuid.uuid4().hex[:8]
    out = {"rss_mib_idle": round(rss_mib(proc.proc.pid), 1)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: channels[n % 8].controller.CreateVolume(
            create_request(f"keep-{tag}-{n}", size=1 << 30)), range(volumes)))
    out["rss_mib_1000_volumes"] = round(rss_mib(proc.proc.pid), 1)
    t0 = time.monotonic()
    listed, token = 0, ""
    while True:
        page = channels[0].controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=500, starting_token=token))
        listed += len(page.entries)
        token = page.next_token
        if not token:
            break
    out["list_1000_volumes_s"] = round(time.monotonic() - t0, 3)
    assert listed == volumes, listed
    return out


def hostpath(binary: str, root: str, seconds: float) -> dict[str, float]:
    endpoint = f"unix://{root}/hostpath.sock"
    os.makedirs(f"{root}/hostpath-state")
    with open(f"{root}/hostpath.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, "--endpoint", endpoint, "--nodeid", "bench-node",
             "--drivername", "hostpath.csi.k8s.io", "--statedir", f"{root}/hostpath-state",
             "--v", "0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_socket(endpoint)
        result = measure_pairs(endpoint, seconds, proc.pid)
        result["rss_mib_idle"] = round(rss_mib(proc.pid), 1)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def python_floor(root: str, seconds: float) -> dict[str, float]:
    """The same pairs against tests/bench/noop_csi.py: Python's gRPC layer doing no work."""
    endpoint = f"unix://{root}/noop.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.noop_csi", "--endpoint",
                             endpoint], cwd=support.REPO)
    try:
        wait_socket(endpoint)
        return measure_pairs(endpoint, seconds, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--stores", default="sqlite,etcd")
    args = ap.parse_args()
    binary = os.environ.get("TANDEM_BENCH_HOSTPATH", "")
    if not binary or not os.access(binary, os.X_OK):
        raise SystemExit("set TANDEM_BENCH_HOSTPATH to a hostpathplugin binary "
                         "(csi-driver-host-path v1.18.0): the reference is measured in the "
                         "same run, never taken from another day")
    stores = args.stores.split(",")
    root = support.make_root("tdm-bench-")
    results: dict[str, float | None] = {}
    etcd = None
    try:
        ref = hostpath(binary, root, args.seconds)
        print(f"hostpath: {ref}", flush=True)
        floor = python_floor(root, args.seconds)
        print(f"python floor (no-op handlers): {floor}", flush=True)
        for c in CLIENTS:
            results[f"python_floor_pairs_per_s_c{c}"] = floor[f"c{c}"]
            results[f"python_floor_over_hostpath_c{c}"] = round(floor[f"c{c}"] / ref[f"c{c}"], 2)
        results["python_floor_cpu_s_per_pair"] = floor["cpu_s_per_pair"]
        if "sqlite" in stores:
            mine = tandem(f"{root}/sqlite", args.seconds, args.volumes, [])
            print(f"tandem (sqlite): {mine}", flush=True)
            for c in CLIENTS:
                results[f"pairs_per_s_c{c}"] = mine[f"c{c}"]
                results[f"hostpath_pairs_per_s_c{c}"] = ref[f"c{c}"]
                results[f"over_hostpath_c{c}"] = round(mine[f"c{c}"] / ref[f"c{c}"], 2)
                results[f"over_python_floor_c{c}"] = round(mine[f"c{c}"] / floor[f"c{c}"], 2)
            results["cpu_s_per_pair"] = mine["cpu_s_per_pair"]
            results["hostpath_cpu_s_per_pair"] = ref["cpu_s_per_pair"]
            for key in ("rss_mib_idle", "rss_mib_1000_volumes", "list_1000_volumes_s"):
                results[key] = mine.get(key)
            results["hostpath_rss_mib_idle"] = ref["rss_mib_idle"]
        if "etcd" in stores:
            etcd = EtcdCluster(f"{root}/etcd").start()
            mine = tandem(f"{root}/etcd-driver", args.seconds, 0, ["--store", etcd.url])
            print(f"tandem (etcd): {mine}", flush=True)
            for c in CLIENTS:
                results[f"etcd_pairs_per_s_c{c}"] = mine[f"c{c}"]
            results["etcd_over_hostpath_c8"] = round(mine["c8"] / ref["c8"], 2)
            results["etcd_cpu_s_per_pair"] = mine["cpu_s_per_pair"]
    finally:
        if etcd is not None:
            etcd.close()
        support.cleanup_tree(root)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
