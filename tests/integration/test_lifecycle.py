"""The driver as a process: start, stop, restart, refuse what would corrupt state."""

import os
import signal
import socket
import subprocess

import grpc
import pytest

from proto import csi_pb2
from tests.integration.helpers import create_request, mounts_under, publish_request, stage_request
from tests.support import DriverProcess


@pytest.fixture
def proc(test_root):
    p = DriverProcess(test_root)
    try:
        yield p
    finally:
        p.stop(signal.SIGKILL)


def test_sigterm_stops_cleanly_and_leaves_no_socket_in_the_way(proc, test_root):
    proc.start()
    assert proc.stop(signal.SIGTERM) == 0
    proc.start()  # the old socket file does not block a new start
    proc.stubs().identity.Probe(csi_pb2.ProbeRequest(), timeout=5)


def test_stale_socket_is_replaced(proc, test_root):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{test_root}/csi.sock")  # bound, never listening: what a dead driver leaves
    s.close()
    proc.start()
    assert proc.stubs().identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value


def test_second_instance_on_same_state_dir_is_refused(proc, test_root):
    proc.start()
    second = DriverProcess(test_root)
    second.endpoint = f"unix://{test_root}/other.sock"
    second.log_path = f"{test_root}/second.log"
    second.start(wait=False)
    assert second.wait_exit() == 2
    assert "already using state dir" in second.log()
    proc.stubs().identity.Probe(csi_pb2.ProbeRequest(), timeout=5)  # the first is unharmed


def test_socket_of_a_live_server_is_not_stolen(proc, test_root):
    proc.start()
    other_root = f"{test_root}/other"
    os.makedirs(other_root)
    second = DriverProcess(other_root)
    second.endpoint = proc.endpoint
    second.start(wait=False)
    assert second.wait_exit() == 2
    assert "in use by another running server" in second.log()


def test_restart_keeps_running_volumes_and_their_data(proc, test_root):
    proc.start()
    stubs = proc.stubs()
    vol = stubs.controller.CreateVolume(create_request("keep")).volume
    staging, target = f"{test_root}/staging", f"{test_root}/target"
    os.makedirs(staging)
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
    stubs.node.NodePublishVolume(publish_request(vol.volume_id, staging, target))
    with open(f"{target}/data", "w") as f:
        f.write("survives restarts")
    before = sorted(mounts_under(test_root))

    assert proc.stop(signal.SIGTERM) == 0
    assert sorted(mounts_under(test_root)) == before  # pods keep their volumes meanwhile
    proc.start()
    assert sorted(mounts_under(test_root)) == before
    stubs = proc.stubs()
    # the CO retries after a restart: same answers, nothing stacked
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
    stubs.node.NodePublishVolume(publish_request(vol.volume_id, staging, target))
    assert sorted(mounts_under(test_root)) == before
    with open(f"{target}/data") as f:
        assert f.read() == "survives restarts"
    stubs.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target))
    stubs.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging))
    stubs.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert mounts_under(test_root) == []


def test_probe_is_ok_and_reports_readiness(proc):
    proc.start()
    rsp = proc.stubs().identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
    assert rsp.ready.value is True
    info = proc.stubs().identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "tandem.csi.dev" and info.vendor_version


def test_bad_flags_are_refused(test_root):
    p = DriverProcess(test_root, extra=["--overcommit-ratio", "-1"])
    p.start(wait=False)
    assert p.wait_exit() != 0
    with pytest.raises(grpc.RpcError):
        p.stubs().identity.Probe(csi_pb2.ProbeRequest(), timeout=1)


@pytest.mark.parametrize("pool_fs", ["xfs", "btrfs"])
def test_empty_volume_lost_to_a_power_cut_is_remade(pool_fs, test_root):
    """Creating an empty volume is not forced to disk; if a power cut takes it back, the
    restart remakes it empty (nothing was ever flushed to it), in either pool layout."""
    proc = DriverProcess(test_root, extra=["--pool-fs", pool_fs])
    try:
        _lost_and_remade(proc, test_root, pool_fs)
    finally:
        proc.stop(signal.SIGKILL)


def _lost_and_remade(proc: DriverProcess, test_root: str, pool_fs: str) -> None:
    proc.start()
    vol = proc.stubs().controller.CreateVolume(create_request("fresh")).volume
    assert proc.stop(signal.SIGTERM) == 0
    volumes_dir = f"{test_root}/state/pool/volumes"
    (name,) = os.listdir(volumes_dir)
    lost = f"{volumes_dir}/{name}"  # what the lost transaction leaves: nothing
    if pool_fs == "btrfs":  # the volume's subvolume
        subprocess.run(["btrfs", "subvolume", "delete", lost], check=True, capture_output=True)
    else:  # the volume's file
        assert name.endswith(".img"), name
        os.remove(lost)
    proc.start()
    assert os.listdir(volumes_dir) == [name]
    staging = f"{test_root}/staging"
    os.makedirs(staging)
    stubs = proc.stubs()
    stubs.node.NodeStageVolume(stage_request(vol.volume_id, staging))
    stubs.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging))
