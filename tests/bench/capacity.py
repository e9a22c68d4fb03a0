"""Benchmark of the node's IOPS capacity measurement (engine/qos/capacity.py): is it stable?

    python -m tests.bench.capacity [--cold-starts 5] [--retries 10] [--pairs 2] [--seconds 20]

1. Cold starts: each on a fresh state dir (a new pool image), the real driver as a process
   without --node-iops-capacity, so its first start measures; the time to ready and the
   figure. Right after, on the same pool, the method this replaced (one 3-second fio run of
   a 256 MiB file, mean IOPS), for comparison. Check: the figures are within +-15% of their
   median.
2. Under load: one driver; `tandem-admin capacity measure` alternately on a quiet node and
   beside a live volume driven by fio (4 KiB random 50/50, iodepth 32: a busy neighbour).
   Check: no figure measured under load is higher than any quiet one.

During each measurement it counts the I/O of the loop devices that are not its own (other
sessions' pools and volumes: their test suites come and go on this shared VM) and the CPU
time of the processes outside its own tree, with the root disk's requests and the CPUs' busy
share for information. A cold start during which the others did more than QUIET_LOOP_IOPS or
used more than QUIET_CPU is "disturbed": it is reported, and repeated (up to
--retries cold starts in all) so that the stability check is made on five cold starts on a
quiet disk, as asked. (The root disk's own counter cannot tell ours from theirs: a pool's
4 KiB writes cost the host filesystem 1.5 requests or so, varying with the load.) The last
line is one JSON object with every figure and the verdicts; the exit code is 1 when a check
fails.
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

from engine.loopdev import LoopDevices
from engine.qos import capacity, fio
from engine.state import SqliteStore
from proto import csi_pb2
from tests import support
from tests.integration.helpers import MIB, create_request, publish_request, stage_request

TOLERANCE = 0.15
QUIET_LOOP_IOPS = 1000  # other sessions' loop device I/O per second (~4% of this VM's figure)
QUIET_CPU = 0.25  # CPUs' worth of other processes' time (of 2): the measurement needs ~1


@dataclass(frozen=True)
class Activity:
    """What else the machine did during a measurement."""

    others_loop_iops: float  # I/O on loop devices that are not the benchmark's
    others_cpu: float  # CPUs' worth of time used by processes outside the benchmark's tree
    disk_iops: float  # all requests on the root disk (ours included)
    cpu_busy: float  # share of all CPUs busy (ours and the kernel's included)

    @property
    def quiet(self) -> bool:
        return self.others_loop_iops < QUIET_LOOP_IOPS and self.others_cpu < QUIET_CPU


def _ios(stat_path: str) -> int:
    try:
        with open(stat_path) as f:
            fields = f.read().split()
    except FileNotFoundError:  # gone meanwhile
        return 0
    return int(fields[0]) + int(fields[4])  # reads + writes completed


def _root_disk_ios() -> int:
    dev = os.stat("/").st_dev
    return _ios(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")


def _loop_ios() -> dict[str, int]:
    """Every loop device's counter, bound or not (a counter survives a detach)."""
    return {name: _ios(f"/sys/block/{name}/stat") for name in os.listdir("/sys/block")
            if name.startswith("loop")}


def _others(root: str) -> set[str]:
    mine = os.path.realpath(root) + "/"
    return {d.name for d in LoopDevices().all() if not d.backing_file.startswith(mine)}


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system clock ticks) of every user-space process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid, flags = int(fields[1]), int(fields[6])
        if flags & 0x00200000 or ppid == 2 or entry == "2":  # PF_KTHREAD: kernel threads
            continue
        found[int(entry)] = (ppid, int(fields[11]) + int(fields[12]))
    return found


def _mine(procs: dict[int, tuple[int, int]]) -> set[int]:
    """This benchmark and its descendants (the driver, fio, tandem-admin)."""
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    return mine


def _cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Watch:
    """The machine's activity from start() to stop(), beside the benchmark's own."""

    def __init__(self, root: str):
        self.root = root

    def start(self) -> Watch:
        self.t0, self.disk0, self.cpu0 = time.monotonic(), _root_disk_ios(), _cpu()
        self.loops0, self.others0 = _loop_ios(), _others(self.root)
        self.procs0 = _processes()
        return self

    def stop(self) -> Activity:
        dt = time.monotonic() - self.t0
        loops, names = _loop_ios(), self.others0 | _others(self.root)
        others = sum(max(0, loops.get(n, 0) - self.loops0.get(n, 0)) for n in names)
        procs = _processes()
        mine = _mine(procs) | _mine(self.procs0)
        # processes alive at both ends (a short-lived one's time is missed: a lower bound)
        ticks = sum(t - self.procs0[pid][1] for pid, (_, t) in procs.items()
                    if pid in self.procs0 and pid not in mine)
        busy, total = (b - a for a, b in zip(self.cpu0, _cpu(), strict=True))
        return Activity(round(others / dt, 1), round(ticks / os.sysconf("SC_CLK_TCK") / dt, 2),
                        round((_root_disk_ios() - self.disk0) / dt, 1),
                        round(busy / max(1, total), 3))


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


def cold_start(seconds: int) -> dict:
    root = support.make_root("tdm-bench-cap-")
    try:
        driver = support.DriverProcess(root, extra=[
            "--node-iops-capacity", "0", "--capacity-measure-seconds", str(seconds)])
        watch = Watch(root).start()
        driver.start(wait=False)
        driver.wait_ready(timeout_s=seconds + 120)
        activity = watch.stop()
        ready_s = time.monotonic() - watch.t0
        try:
            old = old_method(f"{root}/state/pool")
        finally:
            driver.stop()
        cap = stored_capacity(f"{root}/state")
        return {"iops": cap.iops, "first_start_s": round(ready_s, 1), "old_method_iops": old,
                "per_second": {"min": min(cap.samples), "max": max(cap.samples)},
                "during": asdict(activity), "quiet": activity.quiet}
    finally:
        support.cleanup_tree(root)


def admin_measure(root: str, seconds: int) -> tuple[int, Activity]:
    watch = Watch(root).start()
    out = subprocess.run([sys.executable, "-m", "csi.admin", "--state-dir", f"{root}/state",
                          "capacity", "measure", "--seconds", str(seconds)],
                         cwd=support.REPO, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["iops"]), watch.stop()


def under_load(pairs: int, seconds: int) -> dict:
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
            quiet, during_quiet = admin_measure(root, seconds)
            load = subprocess.Popen(load_job.argv(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                time.sleep(2)
                loaded, during_load = admin_measure(root, seconds)
            finally:
                load.terminate()
                load.wait(30)
            rows.append({"quiet_iops": quiet, "loaded_iops": loaded,
                         "during_quiet": asdict(during_quiet),
                         "during_load": asdict(during_load)})
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
    p.add_argument("--retries", type=int, default=10,
                   help="cold starts in all at most, to get --cold-starts quiet ones")
    p.add_argument("--pairs", type=int, default=2, help="quiet/loaded measurement pairs")
    p.add_argument("--seconds", type=int, default=capacity.RUN_S)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: loop devices and mounts")
    colds: list[dict] = []
    while sum(r["quiet"] for r in colds) < a.cold_starts and len(colds) < a.retries:
        row = cold_start(a.seconds)
        colds.append(row)
        print(f"cold start {len(colds)}: {row['iops']} IOPS (first start "
              f"{row['first_start_s']} s; old method {row['old_method_iops']}; during: "
              f"{row['during']}{'' if row['quiet'] else ', disturbed'})", flush=True)
    loaded = under_load(a.pairs, a.seconds)
    for row in loaded["pairs"]:
        print(f"quiet {row['quiet_iops']} (during: {row['during_quiet']}), beside a busy "
              f"volume {row['loaded_iops']} (during: {row['during_load']})", flush=True)
    quiet_colds = [r for r in colds if r["quiet"]]
    cold = spread([r["iops"] for r in quiet_colds]) if quiet_colds else {}
    quiet_all = [r["iops"] for r in colds] + [r["quiet_iops"] for r in loaded["pairs"]]
    under = [r["loaded_iops"] for r in loaded["pairs"]]
    verdicts = {
        "quiet_cold_starts": len(quiet_colds),
        "cold_starts_within_15pct": len(quiet_colds) >= a.cold_starts
        and cold["max_deviation_from_median"] <= TOLERANCE,
        "loaded_never_above_quiet": max(under, default=0) <= min(quiet_all),
    }
    print(json.dumps({
        "method": capacity.describe(a.seconds, capacity.warmup_for(a.seconds), capacity.FILE_BYTES,
                                    capacity.JOBS, capacity.IODEPTH),
        "cold_starts": colds, "quiet_cold_spread": cold,
        "all_cold_spread": spread([r["iops"] for r in colds]),
        "old_method_spread": spread([r["old_method_iops"] for r in colds]),
        "first_start_s": spread([r["first_start_s"] for r in colds]),
        "under_load": loaded, "verdicts": verdicts,
    }))
    return 0 if verdicts["cold_starts_within_15pct"] and verdicts["loaded_never_above_quiet"] \
        else 1


if __name__ == "__main__":
    sys.exit(main())
