"""Backup benchmark: full backup, restore and incremental of a 4 GiB volume, to radosgw.

Against a local Ceph radosgw (tests/rgw.py; a memstore OSD raised to hold the volume),
through two all-in-one drivers' CSI sockets (the second shares only the bucket):
1. a 4 GiB block volume is filled with random (incompressible) data, then backed up
   (CreateSnapshot with backupTarget, repeated until ready_to_use): full_backup_mb_s;
2. 64 MiB of random 4 KiB writes (16,384 distinct blocks), then a second backup:
   incremental_s and incremental_upload_over_changed (bytes the backup sent, packs and
   manifest, counted in the bucket, over the distinct bytes written);
3. the other driver restores the full backup (CreateVolume, retried while ABORTED):
   restore_mb_s; then the incremental one; restore_verified is 1 when both restored
   volumes' SHA-256 equal the source's at each snapshot's instant.
Also a third backup after a sixteenth of the change (incremental_small_s: an incremental's
time follows the changed data, not the volume), and the CPU seconds the drivers spent.
The final line is JSON. Runtime here: about 2.5 minutes on a quiet machine (2 cores), 4
under load; memory: up to 8 GiB for the memstore OSD; disk: sparse pools of up to 16 GiB
each under /tmp (12 GiB free is checked first).

    python -m tests.bench.backup [--size-gib 4] [--changed-mib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import time
import uuid

import boto3
import botocore.config
import grpc

from proto import csi_pb2
from tests import support
from tests.integration.helpers import create_request, publish_request, stage_request
from tests.rgw import RadosGateway

MIB, GIB = 1024**2, 1024**3
BLOCK = 4096
KEY = "benchmark-key-" + "b" * 32


class Node:
    def __init__(self, root: str, targets: str):
        os.makedirs(root)
        self.root = root
        self.driver = support.InProcessDriver(support.test_config(
            root, backup_targets_file=targets, pool_image_bytes=16 * GIB))
        self.stubs = self.driver.stubs

    def publish(self, volume_id: str) -> tuple[str, str]:
        staging, target = f"{self.root}/{volume_id}-st", f"{self.root}/{volume_id}-dev"
        os.makedirs(staging, exist_ok=True)
        self.stubs.node.NodeStageVolume(stage_request(volume_id, staging, block=True))
        self.stubs.node.NodePublishVolume(publish_request(volume_id, staging, target,
                                                          block=True))
        return staging, target

    def unpublish(self, volume_id: str, staging: str, target: str) -> None:
        self.stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target))
        self.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging))


def cpu_s() -> float:
    """CPU seconds of this process (the drivers run in it; radosgw and the OSD do not)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MIB):
            h.update(chunk)
    return h.hexdigest()


def backup(node: Node, name: str, volume_id: str, secrets: dict) -> tuple[float, str]:
    req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                        parameters={"backupTarget": "bench"}, secrets=secrets)
    t0 = time.perf_counter()
    while True:
        snap = node.stubs.controller.CreateSnapshot(req).snapshot
        if snap.ready_to_use:
            return time.perf_counter() - t0, snap.snapshot_id
        time.sleep(0.05)


def restore(node: Node, name: str, snapshot_id: str, size: int, secrets: dict) -> tuple[
        float, str]:
    req = create_request(name, size=size, block=True, secrets=secrets,
                         volume_content_source=csi_pb2.VolumeContentSource(
                             snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                                 snapshot_id=snapshot_id)))
    t0 = time.perf_counter()
    while True:
        try:
            vol = node.stubs.controller.CreateVolume(req).volume
            return time.perf_counter() - t0, vol.volume_id
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
        time.sleep(0.05)


def bucket_bytes(s3, bucket: str) -> dict[str, int]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def run(size_bytes: int, changed_bytes: int) -> dict:
    need = 3 * size_bytes + 4 * GIB
    free = shutil.disk_usage("/tmp").free
    if free < need:
        raise SystemExit(f"needs {need // GIB} GiB free under /tmp, has {free // GIB}")
    root = support.make_root("tdm-bench-backup-")
    rgw = RadosGateway(root, memstore_bytes=size_bytes + 4 * GIB)
    nodes: list[Node] = []
    try:
        rgw.start()
        s3 = boto3.client("s3", endpoint_url=rgw.endpoint, aws_access_key_id=rgw.access_key,
                          aws_secret_access_key=rgw.secret_key, region_name="us-east-1",
                          config=botocore.config.Config(
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required",
                              s3={"addressing_style": "path"}))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        targets = f"{root}/targets.json"
        with open(targets, "w") as f:
            json.dump({"targets": {"bench": {"endpoint": rgw.endpoint, "bucket": bucket}}}, f)
        secrets = {"accessKeyId": rgw.access_key, "secretAccessKey": rgw.secret_key,
                   "encryptionKey": KEY}
        a = Node(f"{root}/a", targets)
        nodes.append(a)
        b = Node(f"{root}/b", targets)
        nodes.append(b)

        vol = a.stubs.controller.CreateVolume(create_request("src", size=size_bytes,
                                                             block=True)).volume
        staging, target = a.publish(vol.volume_id)
        fd = os.open(target, os.O_WRONLY)
        try:
            for off in range(0, size_bytes, 16 * MIB):
                os.pwrite(fd, os.urandom(16 * MIB), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        digests = [digest(target)]
        cpu0 = cpu_s()
        full_s, full_id = backup(a, "full", vol.volume_id, secrets)
        full_cpu = cpu_s() - cpu0
        after_full = bucket_bytes(s3, bucket)

        rng = random.Random(7)
        blocks = rng.sample(range(size_bytes // BLOCK), changed_bytes // BLOCK)
        fd = os.open(target, os.O_WRONLY)
        try:
            for blk in blocks:
                os.pwrite(fd, os.urandom(BLOCK), blk * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        digests.append(digest(target))
        incr_s, incr_id = backup(a, "incremental", vol.volume_id, secrets)
        after_incr = bucket_bytes(s3, bucket)
        new = {k: v for k, v in after_incr.items() if k not in after_full}
        incr_uploaded = sum(new.values())
        # a sixteenth of the change on the same volume: the time follows the change
        small = rng.sample(range(size_bytes // BLOCK), changed_bytes // BLOCK // 16)
        fd = os.open(target, os.O_WRONLY)
        try:
            for blk in small:
                os.pwrite(fd, os.urandom(BLOCK), blk * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        small_s, _ = backup(a, "incremental-small", vol.volume_id, secrets)
        a.unpublish(vol.volume_id, staging, target)

        verified = True
        restore_s = restore_cpu = 0.0
        for i, snapshot_id in enumerate((full_id, incr_id)):
            cpu0 = cpu_s()
            took, rid = restore(b, f"restored-{i}", snapshot_id, size_bytes, secrets)
            if i == 0:
                restore_s, restore_cpu = took, cpu_s() - cpu0
            st, dev = b.publish(rid)
            verified = verified and digest(dev) == digests[i]
            b.unpublish(rid, st, dev)
            b.stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=rid))
        size_mb = size_bytes / MIB
        return {
            "volume_bytes": size_bytes,
            "changed_bytes": len(blocks) * BLOCK,
            "full_backup_s": round(full_s, 2),
            "full_backup_mb_s": round(size_mb / full_s, 1),
            "full_uploaded_bytes": sum(after_full.values()),
            "full_backup_driver_cpu_s": round(full_cpu, 1),
            "restore_s": round(restore_s, 2),
            "restore_mb_s": round(size_mb / restore_s, 1),
            "restore_driver_cpu_s": round(restore_cpu, 1),
            "incremental_s": round(incr_s, 2),
            "incremental_uploaded_bytes": incr_uploaded,
            "incremental_upload_over_changed": round(incr_uploaded / (len(blocks) * BLOCK), 3),
            "incremental_small_changed_bytes": len(small) * BLOCK,
            "incremental_small_s": round(small_s, 2),
            "restore_verified": int(verified),
        }
    finally:
        for node in nodes:
            node.driver.close()
        rgw.close()
        support.cleanup_tree(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=4)
    p.add_argument("--changed-mib", type=int, default=64)
    a = p.parse_args()
    result = run(int(a.size_gib * GIB) // MIB * MIB, a.changed_mib * MIB)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
