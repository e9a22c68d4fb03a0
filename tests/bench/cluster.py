"""Cluster benchmark: a three-zone cluster on this machine (tests/cluster.py), driven
through CSI as the sidecars and the kubelet drive it.

- CreateVolume latency p50/p99 and throughput with 8 concurrent clients, for replicas 1, 2
  and 3, and DeleteVolume's;
- failover_s: from SIGKILL of the consumer node's processes and the cut of its link to the
  first verified write on another node: the frontend's lease expiring in etcd, the HA
  controller's decision (its settle time, control/ha/decide.py; its API calls simulated
  with the same timing: the VolumeAttachment deleted, so ControllerUnpublish), the new
  ControllerPublish (fencing), NodeStage and NodePublish on the new node, and a first
  write that reads back;
- controller_failover_s: from SIGKILL of the leading controller to a new leader elected
  and a CreateVolume answered by the survivor;
- data path through the full CSI path: 4 KiB random writes at QD32 (fio, direct) on a
  3-replica volume staged as a block device against an unmirrored local volume in the
  same run and on the same node, and the QD1 commit latency (write + fdatasync) of both.
  Every replica and the local volume share this machine's one disk: a disk-bound figure
  cannot exceed about 1/3 of local for 3 replicas.

    python -m tests.bench.cluster [--seconds 10] [--creates 40] [--pool-fs xfs|btrfs]

Runtime: about 2 minutes (cluster start ~10 s, creates, two failovers, fio 4 x --seconds).
The final line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import time
import uuid

from control.ha.decide import DEFAULT_SETTLE_S
from mirror.testkit import VerifiedWriter
from proto import csi_pb2
from tests import support
from tests.cluster import TandemCluster, wait_for
from tests.integration.test_cluster_mirror import BLOCK, Attached

MIB = 1024 * 1024


def create_request(cluster: TandemCluster, name: str, replicas: int, zone: int,
                   size: int) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[BLOCK], parameters={"replicas": str(replicas)})
    req.accessibility_requirements.preferred.append(cluster.zone_segments(zone))
    for z in range(1, cluster.zones + 1):
        req.accessibility_requirements.requisite.append(cluster.zone_segments(z))
    return req


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def creates(cluster: TandemCluster, replicas: int, count: int) -> dict[str, float]:
    stubs = [cluster.controller(i % 2).stubs().controller for i in range(8)]
    tag = uuid.uuid4().hex[:6]
    made: list[str] = []
    create_s: list[float] = []
    delete_s: list[float] = []

    def one(n: int) -> None:
        t = time.monotonic()
        vol = stubs[n % 8].CreateVolume(create_request(
            cluster, f"b-{tag}-{n}", replicas, 1 + n % 3, 64 * MIB)).volume
        create_s.append(time.monotonic() - t)
        made.append(vol.volume_id)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.monotonic() - t0

    def drop(i: int) -> None:
        t = time.monotonic()
        stubs[i % 8].DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=made[i]))
        delete_s.append(time.monotonic() - t)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(drop, range(len(made))))
    return {f"create_p50_s_r{replicas}": round(statistics.median(create_s), 4),
            f"create_p99_s_r{replicas}": round(pct(create_s, 0.99), 4),
            f"creates_per_s_r{replicas}": round(count / elapsed, 1),
            f"delete_p50_s_r{replicas}": round(statistics.median(delete_s), 4),
            f"delete_p99_s_r{replicas}": round(pct(delete_s, 0.99), 4)}


def fio(path: str, seconds: float, qd: int, fsync: int = 0) -> dict:
    argv = ["fio", "--name=b", f"--filename={path}", "--rw=randwrite", "--bs=4k",
            f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", "--time_based",
            f"--runtime={seconds}", "--output-format=json", "--size=48M"]
    if fsync:
        argv.append(f"--fdatasync={fsync}")
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]
    sync = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    write = job["write"]["clat_ns"]["percentile"]
    return {"iops": job["write"]["iops"],
            "commit_p50_ms": (write["50.000000"] + sync.get("50.000000", 0)) / 1e6}


def data_path(cluster: TandemCluster, seconds: float) -> dict[str, float]:
    ctl = cluster.controller(0).stubs().controller
    out = {}
    devices = {}
    attached = []
    for name, replicas in (("local", 1), ("r3", 3)):
        vol = ctl.CreateVolume(create_request(cluster, f"dp-{name}-{uuid.uuid4().hex[:6]}",
                                              replicas, 2, 64 * MIB)).volume
        a = Attached(cluster, vol, 2)
        devices[name] = a.up()
        attached.append((a, vol))
    for name, dev in devices.items():
        qd32 = fio(dev, seconds, 32)
        qd1 = fio(dev, seconds, 1, fsync=1)
        out[f"{name}_write_qd32_iops"] = round(qd32["iops"])
        out[f"{name}_commit_p50_ms"] = round(qd1["commit_p50_ms"], 3)
    out["csi_r3_over_local_write_qd32"] = round(
        out["r3_write_qd32_iops"] / out["local_write_qd32_iops"], 3)
    out["csi_r3_commit_p50_ms"] = out.pop("r3_commit_p50_ms")
    for a, vol in attached:
        a.down()
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    return out


def failover(cluster: TandemCluster, settle_s: float) -> float:
    ctl = cluster.controller(0).stubs().controller
    vol = ctl.CreateVolume(create_request(cluster, f"fo-{uuid.uuid4().hex[:6]}", 3, 1,
                                          64 * MIB)).volume
    first = Attached(cluster, vol, 1)
    writer = VerifiedWriter(first.up(), blocks=1024, threads=2, fsync_every=16).start()
    writer.wait_writes(200)
    lost_at = time.monotonic()
    cluster.node(1).kill()
    cluster.node(1).kill_data_path()
    cluster.cut(1)
    writer.stop()
    wait_for(lambda: cluster.store().get(f"frontend/{vol.volume_id}") is None, 60,
             "the lost frontend's lease to expire")
    time.sleep(settle_s)  # the HA controller's decision, then its API calls
    first.detach()
    second = Attached(cluster, vol, 2)
    dev = second.up()
    probe = VerifiedWriter(dev, blocks=16, threads=1, first_block=8192).start()
    probe.wait_writes(1)
    probe.stop()
    took = time.monotonic() - lost_at
    assert not writer.verify(dev, direct=True), "acknowledged writes lost"
    cluster.heal(1)
    cluster.node(1).start()
    return took


def controller_failover(cluster: TandemCluster) -> float:
    leader = cluster.wait_leader()
    other = 1 - leader
    t0 = time.monotonic()
    cluster.controller(leader).kill()
    cluster.wait_leader(other_than=leader)
    cluster.controller(other).stubs().controller.CreateVolume(create_request(
        cluster, f"cf-{uuid.uuid4().hex[:6]}", 1, 2, 64 * MIB))
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--creates", type=int, default=40)
    ap.add_argument("--pool-fs", choices=("xfs", "btrfs"), default="xfs",
                    help="the nodes' pool images (the driver's default: xfs)")
    args = ap.parse_args()
    root = support.make_root("tdm-bench-cl-")
    results: dict[str, float | str] = {"pool_fs": args.pool_fs}
    cluster = TandemCluster(root, mirror=True, frontend_lease_ttl_s=10, fence_margin_s=3.0,
                            node_args=("--pool-fs", args.pool_fs))
    try:
        cluster.up()
        for replicas in (1, 2, 3):
            results.update(creates(cluster, replicas, args.creates))
            print(results, flush=True)
        results.update(data_path(cluster, args.seconds))
        print(results, flush=True)
        results["failover_s"] = round(failover(cluster, DEFAULT_SETTLE_S), 2)
        results["failover_lease_ttl_s"] = cluster.frontend_lease_ttl_s
        results["failover_ha_settle_s"] = DEFAULT_SETTLE_S
        cluster.wait_ready()
        results["controller_failover_s"] = round(controller_failover(cluster), 2)
    finally:
        cluster.down()
        support.cleanup_tree(root)
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
