"""Snapshot benchmark: CreateSnapshot as a user waits for it, against volume size and layout.

For each size and each pool layout (btrfs subvolumes, the default image; reflinked files on
XFS), one driver per (layout, size), everything through its CSI socket:

- just filled: a block volume is filled by 4 KiB random direct writes over all of it (as a
  database leaves it), and CreateSnapshot is timed AT ONCE. No pool sync first: the
  filesystem commit a snapshot waits for (btrfs commits its transaction; XFS forces its
  log) grows with what was written since the last commit, and a backup job that snapshots
  right after a load waits for exactly that.
- steady state: with the pool committed (the snapshot above commits it; a sync checks),
  a fixed 64 MiB is written at random and CreateSnapshot is timed again: the cost of a
  snapshot every so often under load (a backup schedule), which should not grow with the
  volume. The writes land on blocks the first snapshot shares, so they are copied on
  write: the case where a layout pays per new extent.
- read after random writes: the just-filled snapshot's file (the volume as the random fill
  left it) is kept, the rest deleted (and the pool trimmed, so its image gives the space
  back), and a second volume of the same size is written sequentially and snapshotted (its
  snapshot timed: the unfragmented case). Both snapshot files are read in full with 1 MiB
  direct reads, alternately, twice each; the best rate of each is compared. Restores,
  clones, backups and rebuilds read volumes like this.

The reference, csi-driver-host-path v1.18.0's `hostpathplugin` (path from the environment
variable TANDEM_BENCH_HOSTPATH; built by hand from a fetched copy, never part of this
repository), is measured in the same run at every size: a block volume written
sequentially (its most favourable case: its snapshot `cp`s a contiguous file) and
CreateSnapshot timed. Its snapshot is a full copy into the page cache, never synced, so
the comparison is generous to it.

Figures on a shared 2-core VM are noisy: only ratios within one run mean anything. The
final stdout line is JSON: `snapshot_16g_over_1g_filled`, `snapshot_16g_over_1g_steady`,
`snapshot_speedup_vs_hostpath_16g`, `seqread_after_random_ratio` for the first layout given
(by default xfs, the layout these figures choose: docs/snapshots.md), and every per-layout
figure as `LAYOUT_KEY_Ng`. The fixed keys are null when the run did not include 1 and
16 GiB; `..._{hi}g_over_{lo}g_...` keys give the same ratios for the sizes run.

Runtime (this VM, shared): under a minute with --sizes 1, about 4 minutes with --sizes 1,4,
17 minutes (1022 s) with the default 1,4,16 (the 4 KiB random fills of 16 GiB and the
full reads of the btrfs volume dominate). Disk: at 16 GiB about 40 GiB free under /tmp
(checked first): hostpath's volume and copy (32 GiB) are deleted before the layouts run;
a pool holds two 16 GiB volumes at most and is deleted before the next.

    TANDEM_BENCH_HOSTPATH=/path/to/hostpathplugin \\
        python -m tests.bench.snapshot [--sizes 1,4,16] [--layouts xfs,btrfs]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import time

import grpc

from engine.loopdev import LoopDevices
from proto import csi_pb2, csi_pb2_grpc
from tests import support
from tests.integration.helpers import create_request, publish_request, stage_request

GIB = 1024**3
MIB = 1024**2
STEADY_BYTES = 64 * MIB
READ_ROUNDS = 2


def fio(target: str, rw: str, size_bytes: int, io_bytes: int | None = None,
        bs: str = "4k", iodepth: int = 32) -> float:
    """Direct I/O with fio; returns the bandwidth in MiB/s. randwrite's random map writes
    each block at most once, so a full-size randwrite covers every block."""
    io = io_bytes if io_bytes is not None else size_bytes
    out = subprocess.run(
        ["fio", "--name=b", f"--filename={target}", f"--rw={rw}", f"--bs={bs}",
         "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}", f"--size={size_bytes}",
         f"--io_size={io}", "--randrepeat=0", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw in ("read", "randread") else job["write"]
    return side["bw_bytes"] / MIB


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def extents(path: str) -> int:
    out = subprocess.run(["filefrag", path], capture_output=True, text=True).stdout
    return int(out.rsplit(":", 1)[1].split()[0]) if ":" in out else -1


def free_gib(path: str) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / GIB


def btrfs_commit_s(pool: str) -> float:
    """Time the pool has spent in transaction commits so far, as btrfs counts it. Around a
    CreateSnapshot it shows the commits it waited for: the volume's flush commits what the
    fill left (a nodatacow file's fsync in its own subvolume commits the transaction), the
    snapshot ioctl commits again."""
    uuid = subprocess.run(["findmnt", "-no", "UUID", "-T", pool], check=True,
                          capture_output=True, text=True).stdout.strip()
    with open(f"/sys/fs/btrfs/{uuid}/commit_stats") as f:
        stats = dict(line.split() for line in f if line.strip())
    return int(stats["total_commit_ms"]) / 1000


class Volume:
    """A staged and published block volume of one driver."""

    def __init__(self, stubs: support.Stubs, root: str, name: str, size: int):
        self.s, self.name, self.size = stubs, name, size
        self.id = stubs.controller.CreateVolume(
            create_request(name, size=size, block=True)).volume.volume_id
        self.staging, self.device = f"{root}/st-{name}", f"{root}/dev-{name}"
        os.makedirs(self.staging)
        stubs.node.NodeStageVolume(stage_request(self.id, self.staging, block=True))
        stubs.node.NodePublishVolume(
            publish_request(self.id, self.staging, self.device, block=True))

    def snapshot(self, name: str) -> tuple[float, str]:
        t, snap = timed(lambda: self.s.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=self.id)).snapshot)
        return t, snap.snapshot_id

    def release(self) -> None:
        self.s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.id, target_path=self.device))
        self.s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.id, staging_target_path=self.staging))


def newest_snapshot_file(pool: str, before: set[str]) -> str:
    paths = set(glob.glob(f"{pool}/snapshots/*.img") + glob.glob(f"{pool}/snapshots/*/data.img"))
    (new,) = paths - before
    return new


def give_back_space(pool: str, want_free_bytes: int, timeout_s: float = 60.0) -> None:
    """Wait for the pool to free what was deleted (btrfs drops deleted subvolumes in the
    background), then discard it, so the pool image on the host shrinks again: 16 GiB
    runs fit beside other work on the disk."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = os.statvfs(pool)
        if st.f_bavail * st.f_frsize >= want_free_bytes:
            break
        time.sleep(0.5)
    subprocess.run(["fstrim", pool], check=True, capture_output=True)


def bench_tandem(layout: str, gib: int, pool_gib: int) -> dict[str, float]:
    size = gib * GIB
    root = support.make_root("tdm-bench-snap-")
    pool = f"{root}/state/pool"
    proc = support.DriverProcess(root, extra=["--pool-fs", layout, "--pool-size-gib",
                                              str(pool_gib), "--log-level", "WARNING"])
    out: dict[str, float] = {}
    try:
        proc.start()
        s = proc.stubs()
        st = os.statvfs(pool)
        empty_free = st.f_bavail * st.f_frsize
        snaps_before: set[str] = set()

        # just filled
        vol = Volume(s, root, f"rand{gib}", size)
        out["fill_mib_s"] = fio(vol.device, "randwrite", size)
        commit_s = btrfs_commit_s(pool) if layout == "btrfs" else 0.0
        out["snapshot_filled_s"], filled_id = vol.snapshot(f"filled{gib}")
        if layout == "btrfs":  # the transaction commits the snapshot waited for
            out["commit_filled_s"] = btrfs_commit_s(pool) - commit_s
        rand_file = newest_snapshot_file(pool, snaps_before)
        snaps_before.add(rand_file)
        out["extents"] = extents(rand_file)

        # steady state: the pool committed, then a fixed amount written at random
        # (the snapshot just taken committed the pool; a sync makes sure nothing is left)
        out["pool_sync_s"], _ = timed(lambda: subprocess.run(["sync", "-f", pool], check=True))
        fio(vol.device, "randwrite", size, io_bytes=STEADY_BYTES)
        commit_s = btrfs_commit_s(pool) if layout == "btrfs" else 0.0
        out["snapshot_steady_s"], steady_id = vol.snapshot(f"steady{gib}")
        if layout == "btrfs":
            out["commit_steady_s"] = btrfs_commit_s(pool) - commit_s
        steady_file = newest_snapshot_file(pool, snaps_before)
        snaps_before.add(steady_file)
        out["extents_steady"] = extents(steady_file)
        vol.release()
        # keep the volume as the random fill left it (the first snapshot); free the rest
        s.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=steady_id))
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.id))
        give_back_space(pool, empty_free - size - 512 * MIB)

        # sequentially written, same size: its snapshot, and the read rate to compare with
        seq = Volume(s, root, f"seq{gib}", size)
        fio(seq.device, "write", size, bs="1M", iodepth=8)
        out["snapshot_seqfilled_s"], _ = seq.snapshot(f"seq{gib}")
        seq_file = newest_snapshot_file(pool, snaps_before)
        seq.release()
        out["extents_seq"] = extents(seq_file)
        # full sequential reads, alternated and each the best of READ_ROUNDS: other work on
        # the shared disk comes and goes, and a single read pair can straddle it
        rates: dict[str, list[float]] = {"random": [], "seq": []}
        for _ in range(READ_ROUNDS):
            for kind, path in (("random", rand_file), ("seq", seq_file)):
                rates[kind].append(fio(path, "read", size, bs="1M", iodepth=8))
        out["seqread_random_mib_s"] = max(rates["random"])
        out["seqread_seq_mib_s"] = max(rates["seq"])
        out["seqread_after_random_ratio"] = out["seqread_random_mib_s"] / out["seqread_seq_mib_s"]
        s.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=filled_id))
    finally:
        proc.stop(signal.SIGTERM)
        support.cleanup_tree(root)
    return {k: round(v, 4) for k, v in out.items()}


def bench_hostpath(binary: str, gib: int) -> dict[str, float]:
    """hostpath's CreateSnapshot of a block volume just written sequentially: it copies the
    volume's file (`cp`), so its time is the copy's."""
    size = gib * GIB
    root = support.make_root("tdm-bench-hostpath-")
    endpoint = f"unix://{root}/hostpath.sock"
    state = f"{root}/state"
    os.makedirs(state)
    with open(f"{root}/hostpath.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, "--endpoint", endpoint, "--nodeid", "bench-node", "--drivername",
             "hostpath.csi.k8s.io", "--statedir", state, "--v", "0"],
            stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(endpoint)
    controller = csi_pb2_grpc.ControllerStub(channel)
    vol_id = snap_id = ""
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        vol_id = controller.CreateVolume(
            create_request(f"hp{gib}", size=size, block=True)).volume.volume_id
        (backing,) = [p for p in glob.glob(f"{state}/*") if vol_id in p]
        fio(backing, "write", size, bs="1M", iodepth=8)
        t, snap = timed(lambda: controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"hps{gib}", source_volume_id=vol_id)).snapshot)
        snap_id = snap.snapshot_id
        return {"snapshot_filled_s": round(t, 4)}
    finally:
        # hostpath attaches a loop device to a block volume when it makes it, and only
        # DeleteVolume detaches it: a removed file would keep its space through it
        try:
            if snap_id:
                controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap_id))
            if vol_id:
                controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol_id))
        finally:
            channel.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            for dev in LoopDevices().all():  # whatever it left on its files, should it fail
                if dev.backing_file.startswith(state + "/"):
                    LoopDevices().detach(dev.path)
            shutil.rmtree(root, ignore_errors=True)


def ratio(results: dict, key: str, hi: int, lo: int) -> float | None:
    a, b = results.get(f"{key}_{hi}g"), results.get(f"{key}_{lo}g")
    return round(a / b, 2) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,16", help="GiB, comma-separated")
    ap.add_argument("--layouts", default="xfs,btrfs", help="first one is reported as chosen")
    args = ap.parse_args()
    binary = os.environ.get("TANDEM_BENCH_HOSTPATH", "")
    if not binary or not os.access(binary, os.X_OK):
        raise SystemExit("set TANDEM_BENCH_HOSTPATH to a hostpathplugin binary "
                         "(csi-driver-host-path v1.18.0): the reference is measured in the "
                         "same run, never taken from another day")
    sizes = sorted(int(x) for x in args.sizes.split(","))
    layouts = args.layouts.split(",")
    need = 2.2 * max(sizes) + 4
    if free_gib("/tmp") < need:
        raise SystemExit(f"{free_gib('/tmp'):.0f} GiB free under /tmp; {need:.0f} needed")
    results: dict[str, float | None] = {}
    t_start = time.monotonic()
    for gib in sizes:
        hp = bench_hostpath(binary, gib)
        results[f"hostpath_snapshot_filled_s_{gib}g"] = hp["snapshot_filled_s"]
        print(f"hostpath {gib:3} GiB: snapshot {hp['snapshot_filled_s']:8.3f}s", flush=True)
        for layout in layouts:
            # one pool size for every volume size, as on a node (a filesystem's journal
            # grows with it, and what a commit may hold with the journal)
            row = bench_tandem(layout, gib, pool_gib=2 * sizes[-1] + 8)
            for k, v in row.items():
                results[f"{layout}_{k}_{gib}g"] = v
            results[f"{layout}_speedup_vs_hostpath_{gib}g"] = round(
                hp["snapshot_filled_s"] / row["snapshot_filled_s"], 1)
            print(f"{layout:8} {gib:3} GiB: fill {row['fill_mib_s']:6.1f} MiB/s "
                  f"{int(row['extents']):8} extents | snapshot filled "
                  f"{row['snapshot_filled_s']:7.3f}s steady {row['snapshot_steady_s']:7.3f}s "
                  f"seq-filled {row['snapshot_seqfilled_s']:7.3f}s | seq read after random "
                  f"{row['seqread_random_mib_s']:6.1f} vs sequential "
                  f"{row['seqread_seq_mib_s']:6.1f} MiB/s", flush=True)
    lo, hi = sizes[0], sizes[-1]
    for layout in layouts:
        for case in ("filled", "steady", "seqfilled"):
            results[f"{layout}_snapshot_{hi}g_over_{lo}g_{case}"] = ratio(
                results, f"{layout}_snapshot_{case}_s", hi, lo)
    chosen = layouts[0]
    summary = {
        "layout": chosen,
        "sizes_gib": sizes,
        "snapshot_16g_over_1g_filled": ratio(results, f"{chosen}_snapshot_filled_s", 16, 1),
        "snapshot_16g_over_1g_steady": ratio(results, f"{chosen}_snapshot_steady_s", 16, 1),
        "snapshot_speedup_vs_hostpath_16g": results.get(f"{chosen}_speedup_vs_hostpath_16g"),
        f"snapshot_{hi}g_over_{lo}g_filled": results[f"{chosen}_snapshot_{hi}g_over_{lo}g_filled"],
        f"snapshot_{hi}g_over_{lo}g_steady": results[f"{chosen}_snapshot_{hi}g_over_{lo}g_steady"],
        f"snapshot_speedup_vs_hostpath_{hi}g": results[f"{chosen}_speedup_vs_hostpath_{hi}g"],
        "seqread_after_random_ratio": results[f"{chosen}_seqread_after_random_ratio_{hi}g"],
        "runtime_s": round(time.monotonic() - t_start),
        **results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
