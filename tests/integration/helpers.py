"""Request builders and kernel-state checks shared by the integration tests."""

from __future__ import annotations

import os

from engine.loopdev import LoopDevices
from engine.mounts import Mounts
from proto import csi_pb2

MIB = 1024 * 1024
Mode = csi_pb2.VolumeCapability.AccessMode


def capability(block: bool = False, fs_type: str = "ext4",
               mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = fs_type
    return cap


def create_request(name: str, size: int = 64 * MIB, block: bool = False, **kw):
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[capability(block)], **kw)


def stage_request(volume_id: str, staging: str, block: bool = False):
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=capability(block))


def publish_request(volume_id: str, staging: str, target: str, block: bool = False,
                    readonly: bool = False):
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target,
        volume_capability=capability(block), readonly=readonly)


def pool_files(root: str) -> list[str]:
    path = f"{root}/state/pool/volumes"
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def volume_loops(root: str) -> list[str]:
    prefix = f"{root}/state/pool/volumes/"
    return [d.path for d in LoopDevices().all() if d.backing_file.startswith(prefix)]


def mounts_under(root: str, *, except_pool: bool = True) -> list[str]:
    pool = f"{root}/state/pool"
    return [m.target for m in Mounts().table()
            if m.target.startswith(root + "/") and not (except_pool and m.target == pool)]
