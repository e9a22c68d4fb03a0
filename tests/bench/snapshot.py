"""Snapshot benchmark: snapshot, restore and clone time against volume size and layout.

The pool is synced before each timed snapshot, so dirty metadata the fill just left
(which a btrfs snapshot would commit) is not charged to the snapshot; that flush is
reported on its own as pool_sync_s.

For each pool layout (btrfs subvolumes, the default image; reflinked files on XFS) and
each size, a block volume is filled by 4 KiB random direct writes covering all of it
(fragmented, as a database leaves it); then, through the driver's CSI socket:
CreateSnapshot, CreateVolume from the snapshot (restore), CreateVolume from the volume
(clone), each the median of 3; the same-run baseline is a full copy of the volume's
file. Then 5% of the volume is overwritten at random (copy-on-write fragments it again)
and a second snapshot is timed: where a per-extent cost would return.

    python -m tests.bench.snapshot [--sizes 1,4,16] [--layouts btrfs,xfs]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time

from engine.loopdev import LoopDevices
from proto import csi_pb2
from tests import support
from tests.integration.helpers import create_request, publish_request, stage_request

GIB = 1024**3
HOSTPATH_SNAPSHOT_S = {1: 0.49, 4: 2.25, 16: 15.2}
REPEATS = 3


def fio_randwrite(target: str, size_bytes: int, fraction: float = 1.0) -> None:
    """4 KiB random direct writes; fio's random map writes each block at most once."""
    io_bytes = int(size_bytes * fraction) // 4096 * 4096
    subprocess.run(
        ["fio", "--name=fill", f"--filename={target}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=libaio", "--iodepth=32", f"--size={size_bytes}",
         f"--io_size={io_bytes}", "--randrepeat=0", "--output-format=terse"],
        check=True, capture_output=True)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def median_timed(fn, repeats: int = REPEATS):
    """Median of `repeats` runs of fn(i): these operations take milliseconds, where one
    sample is mostly noise."""
    runs = [timed(lambda i=i: fn(i)) for i in range(repeats)]
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def extents(path: str) -> int:
    out = subprocess.run(["filefrag", path], capture_output=True, text=True).stdout
    return int(out.rsplit(":", 1)[1].split()[0]) if ":" in out else -1


def bench_layout(layout: str, sizes: list[int]) -> dict[str, float]:
    root = support.make_root("tdm-bench-snap-")
    pool_gib = max(64, 3 * sum(sizes) + 8)
    proc = support.DriverProcess(root, extra=["--pool-fs", layout, "--pool-size-gib",
                                              str(pool_gib), "--log-level", "WARNING"])
    out: dict[str, float] = {}
    try:
        proc.start()
        s = proc.stubs()
        for gib in sizes:
            size = gib * GIB
            vol = s.controller.CreateVolume(create_request(f"v{gib}", size=size, block=True)).volume
            staging, target = f"{root}/st{gib}", f"{root}/dev{gib}"
            os.makedirs(staging)
            s.node.NodeStageVolume(stage_request(vol.volume_id, staging, block=True))
            s.node.NodePublishVolume(publish_request(vol.volume_id, staging, target, block=True))
            fill_s, _ = timed(lambda: fio_randwrite(target, size))
            # the one volume attached now (earlier sizes were unstaged)
            (backing,) = [d.backing_file for d in LoopDevices().all()
                          if d.backing_file.startswith(f"{root}/state/pool/volumes/")]
            n_extents = extents(backing)
            # Flush what the fill left dirty first (btrfs commits it with a snapshot): the
            # time measured is the layout's cost, not the last seconds of the fill.
            pool_sync_s, _ = timed(lambda: subprocess.run(["sync", "-f", backing], check=True))

            snap_s, snap = median_timed(lambda i: s.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name=f"s{gib}-{i}", source_volume_id=vol.volume_id)
            ).snapshot)

            def restore(i: int) -> None:
                req = create_request(f"r{gib}-{i}", size=size, block=True)
                req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
                s.controller.CreateVolume(req)

            def clone(i: int) -> None:
                req = create_request(f"c{gib}-{i}", size=size, block=True)
                req.volume_content_source.volume.volume_id = vol.volume_id
                s.controller.CreateVolume(req)

            restore_s, _ = median_timed(restore)
            clone_s, _ = median_timed(clone)
            copy_path = f"{root}/copy{gib}.img"
            copy_s, _ = timed(lambda: subprocess.run(
                ["cp", "--reflink=never", "--sparse=never", backing, copy_path], check=True))
            os.unlink(copy_path)

            fio_randwrite(target, size, fraction=0.05)
            n_extents2 = extents(backing)
            subprocess.run(["sync", "-f", backing], check=True)
            snap2_s, _ = median_timed(lambda i: s.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name=f"s{gib}b-{i}", source_volume_id=vol.volume_id)))
            row = dict(fill_s=fill_s, extents=n_extents, pool_sync_s=pool_sync_s,
                       snapshot_s=snap_s, restore_s=restore_s,
                       clone_s=clone_s, copy_s=copy_s, extents_after_5pct=n_extents2,
                       snapshot2_s=snap2_s)
            for k, v in row.items():
                out[f"{layout}_{k}_{gib}g"] = round(v, 4)
            print(f"{layout:6} {gib:3} GiB: {n_extents:7} extents, snapshot {snap_s:7.3f}s "
                  f"restore {restore_s:7.3f}s clone {clone_s:7.3f}s | full copy {copy_s:7.2f}s"
                  f" | after 5% overwrite: {n_extents2:7} extents, snapshot {snap2_s:7.3f}s",
                  flush=True)
            # free the pool for the next size
            s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=target))
            s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging))
    finally:
        proc.stop(signal.SIGTERM)
        support.cleanup_tree(root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--layouts", default="btrfs,xfs")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    layouts = args.layouts.split(",")
    results: dict[str, float] = {}
    for layout in layouts:
        results.update(bench_layout(layout, sizes))
    chosen = layouts[0]  # the default image's layout comes first
    lo, hi = min(sizes), max(sizes)

    def r(key: str, g: int) -> float:
        return results[f"{chosen}_{key}_{g}g"]

    summary = {
        "layout": chosen,
        f"snapshot_s_{lo}g": r("snapshot_s", lo),
        f"snapshot_s_{hi}g": r("snapshot_s", hi),
        f"snapshot_{hi}g_over_{lo}g": round(r("snapshot_s", hi) / r("snapshot_s", lo), 2),
        f"restore_{hi}g_over_{lo}g": round(r("restore_s", hi) / r("restore_s", lo), 2),
        f"clone_{hi}g_over_{lo}g": round(r("clone_s", hi) / r("clone_s", lo), 2),
        f"copy_over_snapshot_{hi}g": round(r("copy_s", hi) / r("snapshot_s", hi), 1),
        f"snapshot2_s_{hi}g": r("snapshot2_s", hi),
        f"snapshot2_{hi}g_over_{lo}g": round(r("snapshot2_s", hi) / r("snapshot2_s", lo), 2),
    }
    if hi in HOSTPATH_SNAPSHOT_S:
        summary[f"hostpath_over_snapshot_{hi}g"] = round(
            HOSTPATH_SNAPSHOT_S[hi] / r("snapshot_s", hi), 1)
    for other in layouts[1:]:
        summary[f"{other}_snapshot_{hi}g_over_{lo}g"] = round(
            results[f"{other}_snapshot_s_{hi}g"] / results[f"{other}_snapshot_s_{lo}g"], 2)
        summary[f"{other}_snapshot2_s_{hi}g"] = results[f"{other}_snapshot2_s_{hi}g"]
    results.update(summary)
    print(json.dumps(summary))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
