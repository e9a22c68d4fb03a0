"""Control-path benchmark: CreateVolume+DeleteVolume pairs per second, and RSS.

Runs the real driver as a process on a private pool, drives it over its unix socket
with 1, 8 and 32 concurrent clients, then measures its resident memory holding 1,000
volumes. The baseline measured in the same run is Probe, the cheapest RPC: it shows
what the gRPC transport alone allows on this machine. The hostpath figures are the
reference measured on this machine class (issue #2), for the ratios.

    python -m tests.bench.control [--seconds 5] [--volumes 1000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import signal
import threading
import time
import uuid

from proto import csi_pb2
from tests import support
from tests.integration.helpers import create_request

HOSTPATH_PAIRS_PER_S = {1: 252, 8: 339, 32: 287}
HOSTPATH_RSS_MIB = 22


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run_clients(clients: int, seconds: float, work) -> int:
    """Run work() in `clients` threads for `seconds`; returns how many completed."""
    stop = time.monotonic() + seconds
    counter = itertools.count()
    done = []

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--volumes", type=int, default=1000)
    args = ap.parse_args()

    root = support.make_root("tdm-bench-")
    proc = support.DriverProcess(root, extra=["--pool-size-gib", "200", "--log-level", "WARNING"])
    results: dict[str, float] = {}
    try:
        proc.start()
        channels = [proc.stubs() for _ in range(32)]  # one channel per client, like sidecars
        tag = uuid.uuid4().hex[:8]

        def probe(i: int, n: int) -> None:
            channels[i].identity.Probe(csi_pb2.ProbeRequest())

        def create_delete(i: int, n: int) -> None:
            c = channels[i].controller
            vol = c.CreateVolume(create_request(f"bench-{tag}-{n}", size=1 << 30)).volume
            c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))

        for clients in (1, 8, 32):
            n = run_clients(clients, args.seconds, probe)
            results[f"probe_per_s_c{clients}"] = round(n / args.seconds, 1)
            n = run_clients(clients, args.seconds, create_delete)
            rate = n / args.seconds
            results[f"create_delete_per_s_c{clients}"] = round(rate, 1)
            results[f"over_hostpath_c{clients}"] = round(rate / HOSTPATH_PAIRS_PER_S[clients], 2)
            print(f"{clients:>2} clients: {rate:8.1f} create+delete pairs/s "
                  f"({rate / HOSTPATH_PAIRS_PER_S[clients]:.2f}x hostpath), "
                  f"probe {results[f'probe_per_s_c{clients}']:.0f}/s", flush=True)

        results["rss_mib_idle"] = round(rss_mib(proc.proc.pid), 1)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(
                lambda n: channels[n % 8].controller.CreateVolume(
                    create_request(f"keep-{tag}-{n}", size=1 << 30)),
                range(args.volumes)))
        results["rss_mib_1000_volumes"] = round(rss_mib(proc.proc.pid), 1)
        t0 = time.monotonic()
        listed = 0
        token = ""
        while True:
            page = channels[0].controller.ListVolumes(
                csi_pb2.ListVolumesRequest(max_entries=500, starting_token=token))
            listed += len(page.entries)
            token = page.next_token
            if not token:
                break
        results["list_1000_volumes_s"] = round(time.monotonic() - t0, 3)
        assert listed == args.volumes, listed
        results["rss_over_hostpath"] = round(results["rss_mib_1000_volumes"] / HOSTPATH_RSS_MIB, 2)
        print(f"RSS: {results['rss_mib_idle']} MiB idle, {results['rss_mib_1000_volumes']} MiB "
              f"with {args.volumes} volumes (hostpath: {HOSTPATH_RSS_MIB} MiB)")
    finally:
        proc.stop(signal.SIGTERM)
        support.cleanup_tree(root)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
