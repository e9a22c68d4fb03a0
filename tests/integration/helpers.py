"""Request builders and kernel-state checks shared by the integration tests."""

from __future__ import annotations

import hashlib
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
    """The pool names of the volumes in a driver's pool: volumes/NAME.img on XFS, a
    subvolume volumes/NAME on btrfs."""
    path = f"{root}/state/pool/volumes"
    names = os.listdir(path) if os.path.isdir(path) else []
    return sorted(name.removesuffix(".img") for name in names)


def volume_image(root: str, pool_name: str) -> str:
    """The image file of the pool volume pool_name, in either layout."""
    base = f"{root}/state/pool/volumes/{pool_name}"
    return f"{base}.img" if os.path.exists(f"{base}.img") else f"{base}/data.img"


def volume_loops(root: str) -> list[str]:
    prefix = f"{root}/state/pool/volumes/"
    return [d.path for d in LoopDevices().all() if d.backing_file.startswith(prefix)]


def mounts_under(root: str, *, except_pool: bool = True) -> list[str]:
    pool = f"{root}/state/pool"
    return [m.target for m in Mounts().table()
            if m.target.startswith(root + "/") and not (except_pool and m.target == pool)]


class BlockVolume:
    """A block volume staged and published through a node's CSI socket, for writing
    whole blocks (synced) and for its digest. timeout: each node call's, in seconds."""

    def __init__(self, stubs, root: str, volume_id: str, timeout: float | None = None):
        self.stubs, self.id, self.timeout = stubs, volume_id, timeout
        self.staging, self.target = f"{root}/{volume_id}-st", f"{root}/{volume_id}-dev"
        os.makedirs(self.staging, exist_ok=True)
        stubs.node.NodeStageVolume(stage_request(volume_id, self.staging, block=True),
                                   timeout=timeout)
        stubs.node.NodePublishVolume(publish_request(volume_id, self.staging, self.target,
                                                     block=True), timeout=timeout)

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.target, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def digest(self) -> str:
        h = hashlib.sha256()
        with open(self.target, "rb") as f:
            while chunk := f.read(4 * MIB):
                h.update(chunk)
        return h.hexdigest()

    def release(self) -> None:
        self.stubs.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.id, target_path=self.target), timeout=self.timeout)
        self.stubs.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.id, staging_target_path=self.staging), timeout=self.timeout)
