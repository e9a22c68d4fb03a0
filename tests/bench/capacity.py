"""Benchmark of the node's IOPS capacity measurement (engine/qos/capacity.py): is it stable?

    python -m tests.bench.capacity [--cold-starts 5] [--pairs 2] [--seconds 20] [--wait-quiet 60]

1. Cold starts: each on a fresh state dir (a new pool image), the real driver as a process
   without --node-iops-capacity, so its first start measures; the time to ready and the
   figure. Right after, on the same pool, the method this replaced (one 3-second fio run of
   a 256 MiB file, mean IOPS), for comparison. Check: the figures are within +-15% of their
   median.
2. Under load: one driver; `tandem-admin capacity measure` alternately on a quiet node and
   beside a live volume driven by fio (4 KiB random 50/50, iodepth 32: a busy neighbour).
   Check: no figure measured under load is higher than any quiet one.

Before each measurement it records the ambient activity of the machine (the root disk's
IOPS and the CPUs' busy share over 3 s, when the benchmark itself does nothing); with
--wait-quiet N it waits up to N s for a quiet moment first (this VM is shared: other
sessions' test suites come and go). The last line is one JSON object with every figure and
the verdicts; the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from engine.qos import capacity, fio
from engine.state import SqliteStore
from proto import csi_pb2
from tests import support
from tests.integration.helpers import MIB, create_request, publish_request, stage_request

TOLERANCE = 0.15
QUIET_DISK_IOPS = 300  # root disk I/O by others, per second
QUIET_CPU_BUSY = 0.35  # share of both CPUs busy with others' work


@dataclass(frozen=True)
class Ambient:
    disk_iops: float
    cpu_busy: float

    @property
    def quiet(self) -> bool:
        return self.disk_iops < QUIET_DISK_IOPS and self.cpu_busy < QUIET_CPU_BUSY


def _root_disk_stat() -> str:
    dev = os.stat("/").st_dev
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"


def _disk_ios(path: str) -> int:
    with open(path) as f:
        fields = f.read().split()
    return int(fields[0]) + int(fields[4])  # reads + writes completed


def _cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def ambient(seconds: float = 3.0) -> Ambient:
    stat = _root_disk_stat()
    ios0, (busy0, total0) = _disk_ios(stat), _cpu()
    time.sleep(seconds)
    ios1, (busy1, total1) = _disk_ios(stat), _cpu()
    return Ambient(round((ios1 - ios0) / seconds, 1),
                   round((busy1 - busy0) / max(1, total1 - total0), 3))


def wait_quiet(limit_s: float) -> Ambient:
    deadline = time.monotonic() + limit_s
    while True:
        amb = ambient()
        if amb.quiet or time.monotonic() >= deadline:
            return amb


def spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": round(med), "min": round(min(values)), "max": round(max(values)),
            "max_deviation_from_median": round(max(abs(v / med - 1) for v in values), 3),
            "max_over_min": round(max(values) / min(values), 3)}


def old_method(pool_dir: str) -> int:
    """The measurement this replaced: one 3-second run, iodepth 16, 256 MiB, the mean."""
    fd, path = tempfile.mkstemp(prefix=capacity.SCRATCH_PREFIX, dir=pool_dir)
    os.close(fd)
    try:
        return int(fio.run(fio.FioJob(path, "randrw", runtime_s=3, iodepth=16,
                                      size_bytes=256 * MIB, name="old")).iops)
    finally:
        os.unlink(path)


def stored_capacity(state_dir: str) -> capacity.Capacity:
    store = SqliteStore(os.path.join(state_dir, "state.sqlite"))
    try:
        cap = capacity.load(store)
    finally:
        store.close()
    assert cap is not None, "no capacity recorded"
    return cap


def cold_start(seconds: int, quiet_wait_s: float) -> dict:
    root = support.make_root("tdm-bench-cap-")
    try:
        amb = wait_quiet(quiet_wait_s)
        driver = support.DriverProcess(root, extra=[
            "--node-iops-capacity", "0", "--capacity-measure-seconds", str(seconds)])
        t0 = time.monotonic()
        driver.start(wait=False)
        driver.wait_ready(timeout_s=seconds + 120)
        ready_s = time.monotonic() - t0
        try:
            old = old_method(f"{root}/state/pool")
        finally:
            driver.stop()
        cap = stored_capacity(f"{root}/state")
        return {"iops": cap.iops, "first_start_s": round(ready_s, 1), "old_method_iops": old,
                "per_second": {"min": min(cap.samples), "max": max(cap.samples)},
                "ambient": asdict(amb), "quiet": amb.quiet}
    finally:
        support.cleanup_tree(root)


def admin_measure(state_dir: str, seconds: int) -> int:
    out = subprocess.run([sys.executable, "-m", "csi.admin", "--state-dir", state_dir,
                          "capacity", "measure", "--seconds", str(seconds)],
                         cwd=support.REPO, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["iops"])


def under_load(pairs: int, seconds: int, quiet_wait_s: float) -> dict:
    root = support.make_root("tdm-bench-cap-")
    driver = support.DriverProcess(root)  # a fixed figure at start: measured below
    rows = []
    try:
        driver.start()
        stubs = driver.stubs()
        vol = stubs.controller.CreateVolume(create_request("neighbour", size=1024 * MIB,
                                                           block=True)).volume
        staging, target = f"{root}/staging", f"{root}/target"
        os.makedirs(staging)
        stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging, block=True))
        stubs.node.NodePublishVolume(publish_request(vol.volume_id, staging, target, block=True))
        load_job = fio.FioJob(target, "randrw", runtime_s=3600, iodepth=32, name="neighbour")
        for _ in range(pairs):
            amb = wait_quiet(quiet_wait_s)
            quiet = admin_measure(f"{root}/state", seconds)
            load = subprocess.Popen(load_job.argv(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                time.sleep(2)
                loaded = admin_measure(f"{root}/state", seconds)
            finally:
                load.terminate()
                load.wait(30)
            rows.append({"quiet_iops": quiet, "loaded_iops": loaded, "ambient": asdict(amb)})
        stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target))
        stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging))
        stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        stubs.channel.close()
    finally:
        driver.stop()
        support.cleanup_tree(root)
    return {"pairs": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cold-starts", type=int, default=5)
    p.add_argument("--pairs", type=int, default=2, help="quiet/loaded measurement pairs")
    p.add_argument("--seconds", type=int, default=capacity.RUN_S)
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this long for a quiet machine before each measurement")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: loop devices and mounts")
    colds = []
    for i in range(a.cold_starts):
        row = cold_start(a.seconds, a.wait_quiet)
        colds.append(row)
        print(f"cold start {i + 1}: {row['iops']} IOPS (first start {row['first_start_s']} s; "
              f"old method {row['old_method_iops']}; ambient {row['ambient']})", flush=True)
    loaded = under_load(a.pairs, a.seconds, a.wait_quiet)
    for row in loaded["pairs"]:
        print(f"quiet {row['quiet_iops']}, beside a busy volume {row['loaded_iops']} "
              f"(ambient {row['ambient']})", flush=True)
    cold = spread([r["iops"] for r in colds])
    quiet_all = [r["iops"] for r in colds] + [r["quiet_iops"] for r in loaded["pairs"]]
    under = [r["loaded_iops"] for r in loaded["pairs"]]
    verdicts = {
        "cold_starts_within_15pct": cold["max_deviation_from_median"] <= TOLERANCE,
        "loaded_never_above_quiet": max(under, default=0) <= min(quiet_all),
    }
    print(json.dumps({
        "method": capacity.describe(a.seconds, capacity.WARMUP_S, capacity.FILE_BYTES,
                                    capacity.JOBS, capacity.IODEPTH),
        "cold_starts": colds, "cold_spread": cold,
        "old_method_spread": spread([r["old_method_iops"] for r in colds]),
        "first_start_s": spread([r["first_start_s"] for r in colds]),
        "under_load": loaded, "verdicts": verdicts,
    }))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
