"""A store whose view is lost or older than the node's storage deletes nothing.

The remote-flavoured crash cases of the intent protocol, played on the real driver: the
cluster store emptied (a new etcd namespace, a deleted cluster.sqlite), restored from a
backup taken before later volumes existed, and the node's own store lost. Every volume's
storage survives; what no record owns is reported as an orphan, and only an explicit
`tandem-admin purge` removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from control.local_node import LocalNode
from csi import admin
from proto import csi_pb2
from tests import support
from tests.conftest import etcd_namespace
from tests.integration.helpers import create_request, pool_files, publish_request, stage_request
from tests.support import DriverProcess, InProcessDriver


def _orphans(root: str) -> dict:
    with open(f"{root}/state/orphans.json") as f:
        return json.load(f)


def _ids(stubs) -> list[str]:
    return sorted(e.volume.volume_id
                  for e in stubs.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries)


@pytest.mark.parametrize("store", ["sqlite", "etcd"])
def test_a_lost_cluster_store_deletes_nothing(request, test_root, store):
    namespace = etcd_namespace()
    extra = ["--store", request.getfixturevalue("etcd_url"), "--store-namespace",
             namespace] if store == "etcd" else []
    proc = DriverProcess(test_root, extra=extra)
    staging, target = f"{test_root}/staging", f"{test_root}/dev"
    os.makedirs(staging)
    try:
        s = proc.start().stubs()
        used = s.controller.CreateVolume(create_request("used", block=True)).volume.volume_id
        idle = s.controller.CreateVolume(create_request("idle")).volume.volume_id
        s.node.NodeStageVolume(stage_request(used, staging, block=True))
        s.node.NodePublishVolume(publish_request(used, staging, target, block=True))
        with open(target, "r+b") as f:
            f.write(b"precious" * 512)
            os.fsync(f.fileno())
        proc.stop()
        # the cluster's view is gone: a fresh etcd namespace, or no cluster.sqlite
        if store == "etcd":
            proc.extra[-1] = etcd_namespace()
        else:
            for suffix in ("", "-wal", "-shm"):
                path = f"{test_root}/state/cluster.sqlite{suffix}"
                if os.path.exists(path):
                    os.unlink(path)
        s = proc.start().stubs()
        assert _ids(s) == []  # the CO's view follows the store
        assert len(pool_files(test_root)) == 2  # ... but no storage went
        report = _orphans(test_root)
        assert sorted(report["volumes"]) == sorted([used, idle])
        assert "orphan" in proc.log()
        with open(target, "rb") as f:
            assert f.read(8) == b"precious"
        # the node can still take its volume down: its own records are intact
        s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=used, target_path=target))
        s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=used, staging_target_path=staging))
        assert len(pool_files(test_root)) == 2
    finally:
        proc.stop(signal.SIGKILL)


def test_a_store_restored_from_an_older_backup_deletes_nothing(test_root):
    proc = DriverProcess(test_root)
    try:
        s = proc.start().stubs()
        old = s.controller.CreateVolume(create_request("old")).volume.volume_id
        proc.stop()
        backup = f"{test_root}/backup"
        os.makedirs(backup)
        for name in os.listdir(f"{test_root}/state"):
            if name.startswith("cluster.sqlite"):
                shutil.copy2(f"{test_root}/state/{name}", backup)
        s = proc.start().stubs()
        new = s.controller.CreateVolume(create_request("new")).volume.volume_id
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=old))
        proc.stop()
        for name in os.listdir(f"{test_root}/state"):
            if name.startswith("cluster.sqlite"):
                os.unlink(f"{test_root}/state/{name}")
        for name in os.listdir(backup):
            shutil.copy2(f"{backup}/{name}", f"{test_root}/state/")
        s = proc.start().stubs()
        # the restored store still lists the deleted volume, now without storage: abnormal
        assert _ids(s) == [old]
        cond = s.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=old)).status.volume_condition
        assert cond.abnormal and "missing" in cond.message
        # the newer volume the backup does not know is kept and reported
        assert len(pool_files(test_root)) == 1
        assert _orphans(test_root)["volumes"] == [new]
    finally:
        proc.stop(signal.SIGKILL)


def test_a_lost_node_store_deletes_nothing_and_purge_is_explicit(test_root):
    proc = DriverProcess(test_root)
    try:
        s = proc.start().stubs()
        vol = s.controller.CreateVolume(create_request("v")).volume.volume_id
        proc.stop()
        for name in os.listdir(f"{test_root}/state"):
            if name.startswith("state.sqlite"):
                os.unlink(f"{test_root}/state/{name}")
        s = proc.start().stubs()
        (pool_name,) = pool_files(test_root)
        assert _orphans(test_root)["pool_volumes"] == [pool_name]
        cond = s.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=vol)).status.volume_condition
        assert cond.abnormal
        # purge refuses while the driver runs, then removes exactly what it was asked to
        assert admin.main(["--state-dir", f"{test_root}/state", "purge", pool_name]) == 2
        assert pool_files(test_root) == [pool_name]
        proc.stop()
        assert admin.main(["--state-dir", f"{test_root}/state", "purge", pool_name]) == 0
        assert pool_files(test_root) == []
        with pytest.raises(SystemExit):
            admin.main(["--state-dir", f"{test_root}/state", "purge", "../../etc"])
    finally:
        proc.stop(signal.SIGKILL)


def test_orphans_are_listed_by_tandem_admin(test_root, capsys):
    proc = DriverProcess(test_root)
    try:
        s = proc.start().stubs()
        vol = s.controller.CreateVolume(create_request("v")).volume.volume_id
        proc.stop()
        os.unlink(f"{test_root}/state/cluster.sqlite")
        proc.start()
        deadline = time.monotonic() + 10
        while _orphans(test_root)["volumes"] != [vol] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert admin.main(["--state-dir", f"{test_root}/state", "orphans"]) == 0
        assert vol in capsys.readouterr().out
    finally:
        proc.stop(signal.SIGKILL)


def test_a_node_with_orphans_says_so_in_its_condition(test_root):
    """What the node registers (its NodeInfo: the cluster's node record) carries an
    abnormal condition while storage no record owns is kept, pointing at the tool."""
    driver = InProcessDriver(support.test_config(test_root))
    try:
        driver.stubs.controller.CreateVolume(create_request("v"))
        assert not LocalNode(driver.driver.engine, 8).info().condition.abnormal
    finally:
        driver.close()
    for name in os.listdir(f"{test_root}/state"):  # the node's store is lost
        if name.startswith("state.sqlite"):
            os.unlink(f"{test_root}/state/{name}")
    driver = InProcessDriver(support.test_config(test_root))
    try:
        condition = LocalNode(driver.driver.engine, 8).info().condition
        assert condition.abnormal and "tandem-admin orphans" in condition.message
        assert len(pool_files(test_root)) == 1  # kept, not deleted
    finally:
        driver.close()
