"""Fixtures of the conformance suite.

`co` is a small stand-in for a container orchestrator (or csi-sanity): it makes the
calls the way the sanity suite does, repeats every successful one (idempotency), and
after the test cleans up the way the suite does after every spec: NodeUnpublish and
NodeUnstage for every volume it made (even ones never staged) accepting only OK or
NOT_FOUND, then ControllerUnpublish and DeleteVolume, which must succeed. The
`test_root` fixture's cleanup_tree still removes whatever is left after that.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import pytest

from proto import csi_pb2
from tests import support
from tests.conformance.helpers import (
    NOT_FOUND,
    OK,
    SMALL,
    SNW,
    call,
    capability,
    loops_left_under,
    mounts_at,
    mounts_under,
    ok,
    rpc_name,
)
from tests.conftest import etcd_namespace, require_root


@pytest.fixture
def test_root():
    """As the shared fixture, with a prefix of our own (so a leak is ours to find) and a
    check that nothing under it is still mounted or attached once it is cleaned up."""
    require_root()
    root = support.make_root("tdm-conf-")
    try:
        yield root
    finally:
        support.cleanup_tree(root)
        left = [m.target for m in mounts_under(root)] + [d.path for d in loops_left_under(root)]
        assert not left, f"left behind under {root}: {left}"



@pytest.fixture(params=["sqlite", "etcd"])
def driver(request, test_root):
    """The all-in-one driver on each cluster store: the suite is the stores' CSI contract.
    And on each pool layout, at no extra cost: SQLite on the default XFS image (reflinked
    files), etcd on a btrfs image (subvolumes)."""
    overrides = {}
    if request.param == "etcd":
        overrides = dict(store_url=request.getfixturevalue("etcd_url"),
                         store_namespace=etcd_namespace(), pool_image_fs="btrfs")
    d = support.InProcessDriver(support.test_config(test_root, **overrides))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(params=["mount", "block"])
def access_type(request) -> str:
    """Node-side tests run once per access type, as csi-sanity is run in both."""
    return request.param


@dataclass
class Made:
    volume_id: str
    targets: list[str] = field(default_factory=list)
    stagings: list[str] = field(default_factory=list)
    published_to: set[str] = field(default_factory=set)


class CO:
    def __init__(self, driver, root: str):
        self.driver = driver
        self.stubs = driver.stubs
        self.root = root
        self.node_id = driver.config.node_id
        # Volume files live in the pool directory: their loop devices are found by that.
        self.pool_dir = os.path.realpath(driver.config.pool_directory)
        self.made: dict[str, Made] = {}
        self._seq = itertools.count(1)

    # --- paths, made the way a CO makes them ----------------------------------------
    def staging_dir(self, name: str = "") -> str:
        """A staging directory, created (kubelet and csi-sanity create it)."""
        path = f"{self.root}/staging/{name or f'st{next(self._seq)}'}"
        os.makedirs(path)
        return path

    def target_path(self, name: str = "") -> str:
        """A publish target: its parent exists, the target itself does not."""
        os.makedirs(f"{self.root}/target", exist_ok=True)
        return f"{self.root}/target/{name or f'tg{next(self._seq)}'}"

    # --- controller -----------------------------------------------------------------
    def create_request(self, name: str = "", size: int = SMALL, access_type: str = "mount",
                       mode: int = SNW, fs_type: str = "", limit: int = 0,
                       **extra) -> csi_pb2.CreateVolumeRequest:
        return csi_pb2.CreateVolumeRequest(
            name=name or f"conformance-{next(self._seq)}",
            capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit),
            volume_capabilities=[capability(access_type, mode, fs_type)],
            **extra,
        )

    def create(self, name: str = "", size: int = SMALL, access_type: str = "mount",
               repeat: int = 2, **kw) -> csi_pb2.Volume:
        req = self.create_request(name, size, access_type, **kw)
        vol = ok(self.stubs.controller.CreateVolume, req, repeat).volume
        assert vol.volume_id
        self.made.setdefault(vol.volume_id, Made(vol.volume_id))
        return vol

    def controller_publish(self, volume_id: str, access_type: str = "mount", *,
                           readonly: bool = False, mode: int = SNW, repeat: int = 2):
        rsp = ok(self.stubs.controller.ControllerPublishVolume,
                 csi_pb2.ControllerPublishVolumeRequest(
                     volume_id=volume_id, node_id=self.node_id,
                     volume_capability=capability(access_type, mode), readonly=readonly),
                 repeat)
        self._made(volume_id).published_to.add(self.node_id)
        return rsp

    # --- node -----------------------------------------------------------------------
    def stage_request(self, volume_id: str, staging: str, access_type: str, mode: int = SNW,
                      fs_type: str = "") -> csi_pb2.NodeStageVolumeRequest:
        return csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging,
            volume_capability=capability(access_type, mode, fs_type))

    def stage(self, volume_id: str, access_type: str, staging: str = "", *, mode: int = SNW,
              fs_type: str = "", repeat: int = 2) -> str:
        staging = staging or self.staging_dir()
        self._made(volume_id).stagings.append(staging)
        ok(self.stubs.node.NodeStageVolume,
           self.stage_request(volume_id, staging, access_type, mode, fs_type), repeat)
        return staging

    def publish_request(self, volume_id: str, staging: str, target: str, access_type: str,
                        *, readonly: bool = False, mode: int = SNW,
                        fs_type: str = "") -> csi_pb2.NodePublishVolumeRequest:
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target,
            volume_capability=capability(access_type, mode, fs_type), readonly=readonly)

    def publish(self, volume_id: str, access_type: str, staging: str, target: str = "", *,
                readonly: bool = False, mode: int = SNW, fs_type: str = "",
                repeat: int = 2) -> str:
        target = target or self.target_path()
        self._made(volume_id).targets.append(target)
        ok(self.stubs.node.NodePublishVolume,
           self.publish_request(volume_id, staging, target, access_type, readonly=readonly,
                                mode=mode, fs_type=fs_type), repeat)
        return target

    def unpublish(self, volume_id: str, target: str, repeat: int = 2) -> None:
        ok(self.stubs.node.NodeUnpublishVolume,
           csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), repeat)

    def unstage(self, volume_id: str, staging: str, repeat: int = 2) -> None:
        ok(self.stubs.node.NodeUnstageVolume,
           csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
           repeat)

    def _made(self, volume_id: str) -> Made:
        return self.made.setdefault(volume_id, Made(volume_id))

    # --- the suite's AfterEach --------------------------------------------------------
    def cleanup(self) -> list[str]:
        errors = []

        def check(method, request, allowed):
            code, _, details = call(method, request)
            if code not in allowed:
                errors.append(f"{rpc_name(method)}({request.volume_id}): {code.name}: {details}")

        for made in reversed(list(self.made.values())):
            for target in reversed(made.targets):
                check(self.stubs.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=made.volume_id, target_path=target), {OK, NOT_FOUND})
            for staging in reversed(made.stagings):
                check(self.stubs.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=made.volume_id, staging_target_path=staging), {OK, NOT_FOUND})
            for node_id in made.published_to:
                check(self.stubs.controller.ControllerUnpublishVolume,
                      csi_pb2.ControllerUnpublishVolumeRequest(
                          volume_id=made.volume_id, node_id=node_id), {OK})
            check(self.stubs.controller.DeleteVolume,
                  csi_pb2.DeleteVolumeRequest(volume_id=made.volume_id), {OK})
            # What the suite's Teardown needs: targets gone, staging dirs empty.
            for target in made.targets:
                if os.path.lexists(target):
                    errors.append(f"{target} still exists after NodeUnpublishVolume")
            for staging in made.stagings:
                if mounts_at(staging):
                    errors.append(f"{staging} is still a mount point after NodeUnstageVolume")
                elif os.path.isdir(staging) and os.listdir(staging):
                    errors.append(f"{staging} is not empty after NodeUnstageVolume: "
                                  f"{os.listdir(staging)}")
        self.made.clear()
        # Everything unpublished, unstaged and deleted: no device or mount may remain
        # but the pool's own.
        errors += [f"loop device left: {d.path} on {d.backing_file}"
                   for d in loops_left_under(self.pool_dir)]
        errors += [f"mount left: {m.target}" for m in mounts_under(self.root)
                   if m.target != self.pool_dir]
        return errors


@pytest.fixture
def co(driver, test_root):
    orchestrator = CO(driver, test_root)
    yield orchestrator
    errors = orchestrator.cleanup()
    assert not errors, "the sanity-style cleanup after the test failed:\n" + "\n".join(errors)
