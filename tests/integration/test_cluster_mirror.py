"""Mirrored volumes in a three-zone cluster, driven through CSI as the sidecars and the
kubelet would: provision `replicas: 3`, attach (= fence) and stage on one node, write
verified data, then lose that node (its processes killed, its link cut), fail over to
another zone, and find every acknowledged block; the lost zone comes back and resyncs.

The HA controller's part (noticing the frontend's lease expired, deleting the
VolumeAttachment so the attacher unpublishes, the pod recreated elsewhere) is played here
with the same inputs: the test waits for `frontend/<volume>` to vanish from etcd, then
makes the attacher's and the kubelet's calls on the new node.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import time

import grpc
import pytest

from control import mirrored
from csi import admin_replicas
from engine.state import SqliteStore
from mirror.spec import REGION_BYTES
from mirror.testkit import VerifiedWriter
from proto import csi_pb2
from tests.cluster import RETRIED_BY_THE_PROVISIONER, TandemCluster, running, wait_for

MIB = 1024 * 1024
SIZE = 64 * MIB
BLOCK = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


@pytest.fixture(scope="module")
def cluster(request):
    with running(request, "tdm-clm-", mirror=True) as c:
        yield c


def create(cluster: TandemCluster, name: str, preferred_zone: int,
           replicas: int = 3) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[BLOCK], parameters={"replicas": str(replicas)})
    req.accessibility_requirements.preferred.append(cluster.zone_segments(preferred_zone))
    for z in range(1, cluster.zones + 1):
        req.accessibility_requirements.requisite.append(cluster.zone_segments(z))
    return cluster.controller(0).stubs().controller.CreateVolume(req).volume


class Attached:
    """The attacher's and the kubelet's calls for one node."""

    def __init__(self, cluster: TandemCluster, vol: csi_pb2.Volume, zone: int):
        self.cluster, self.vol, self.node = cluster, vol, cluster.node(zone)
        self.staging = os.path.join(cluster.root, f"kubelet-z{zone}", vol.volume_id, "stg")
        self.target = os.path.join(cluster.root, f"kubelet-z{zone}", vol.volume_id, "dev")
        os.makedirs(self.staging, exist_ok=True)

    def up(self) -> str:
        ctl = self.cluster.controller(1).stubs().controller
        published = ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=self.vol.volume_id, node_id=self.node.node_id, volume_capability=BLOCK,
            volume_context=self.vol.volume_context))
        self.context = dict(published.publish_context)
        node = self.node.stubs().node
        node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging,
            volume_capability=BLOCK, publish_context=self.context,
            volume_context=self.vol.volume_context))
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging,
            target_path=self.target, volume_capability=BLOCK,
            publish_context=self.context, volume_context=self.vol.volume_context))
        return self.target

    def down(self) -> None:
        node = self.node.stubs().node
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, target_path=self.target))
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=self.staging))
        self.detach()

    def detach(self) -> None:
        self.cluster.controller(0).stubs().controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=self.vol.volume_id,
                                                     node_id=self.node.node_id))


def delete(cluster: TandemCluster, volume_id: str) -> None:
    """As the provisioner does: retried while a replica is still held (a frontend that just
    stopped, whose connection its replica service has not closed yet)."""
    def gone() -> bool:
        try:
            cluster.controller(0).stubs().controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        except grpc.RpcError as e:
            if e.code() not in RETRIED_BY_THE_PROVISIONER:
                raise
            return False
        return True
    wait_for(gone, 30, f"DeleteVolume of {volume_id}")
    wait_for(lambda: cluster.store().get(f"volume/{volume_id}") is None, 30,
             "the deleted volume's records gone")


def frontend_log(cluster: TandemCluster, zone: int, volume_id: str, tail: int = 3000) -> str:
    path = os.path.join(cluster.node(zone).state_dir, "frontends", volume_id, "worker.log")
    try:
        with open(path, errors="replace") as f:
            return f.read()[-tail:]
    except FileNotFoundError:
        return f"(no {path})"


def condition(cluster: TandemCluster, volume_id: str) -> csi_pb2.VolumeCondition:
    return cluster.controller(0).stubs().controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)).status.volume_condition


def test_a_mirrored_volume_lives_through_csi(cluster):
    vol = create(cluster, "mirrored-life", preferred_zone=2)
    assert vol.volume_context[mirrored.MIRRORED_KEY] == "true"
    zones = sorted(t.segments["topology.tandem.csi.dev/zone"] for t in vol.accessible_topology)
    assert zones == ["zone-1", "zone-2", "zone-3"]
    a = Attached(cluster, vol, 2)
    dev = a.up()
    assert a.context[mirrored.GENERATION_KEY] == "1"
    writer = VerifiedWriter(dev, blocks=2048, threads=2).start()
    writer.wait_writes(300)
    writer.stop()
    assert writer.errors == [] and writer.verify(dev, direct=True) == []
    cond = condition(cluster, vol.volume_id)
    assert not cond.abnormal, cond.message
    for n in cluster.nodes:  # each replica is a backing of its node's pool, in its records
        store = SqliteStore(os.path.join(n.state_dir, "state.sqlite"))
        try:
            backing = store.get("backing", vol.volume_id)
        finally:
            store.close()
        assert backing is not None and backing["role"] == "replica", n.node_id
        assert os.path.exists(os.path.join(n.pool_dir, "replicas", vol.volume_id))
    a.down()
    got = cluster.store().get(f"frontend/{vol.volume_id}")
    assert got is not None and got.value["state"] == "stopped"
    delete(cluster, vol.volume_id)
    for n in cluster.nodes:  # every replica's storage went
        assert not os.path.exists(os.path.join(n.pool_dir, "replicas", vol.volume_id))


def test_failover_to_another_zone_loses_no_acknowledged_write(cluster):
    vol = create(cluster, "mirrored-failover", preferred_zone=1)
    first = Attached(cluster, vol, 1)
    dev = first.up()
    writer = VerifiedWriter(dev, blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(300)
    # zone 1 dies: its processes (agent, replica service, frontend) killed, its link cut
    lost_at = time.monotonic()
    cluster.node(1).kill()
    cluster.node(1).kill_data_path()
    cluster.cut(1)
    writer.stop()
    # the HA controller's trigger: the frontend's lease expires in etcd
    wait_for(lambda: cluster.store().get(f"frontend/{vol.volume_id}") is None, 30,
             "the dead frontend's lease to expire")
    first.detach()  # the VolumeAttachment deleted: the attacher unpublishes
    second = Attached(cluster, vol, 2)
    dev2 = second.up()
    assert int(second.context[mirrored.GENERATION_KEY]) > int(
        first.context[mirrored.GENERATION_KEY])
    failover_s = time.monotonic() - lost_at
    assert writer.verify(dev2, direct=True) == []  # every acknowledged block is there
    again = VerifiedWriter(dev2, blocks=2048, threads=2, first_block=4096).start()
    again.wait_writes(100)
    again.stop()
    assert again.errors == []
    cond = condition(cluster, vol.volume_id)
    assert cond.abnormal and "node-z1" in cond.message  # the lost replica shows
    lost = [r for row in admin_replicas.report(cluster.store(), [vol.volume_id])
            for r in row["replicas"] if r["node_id"] == "node-z1"]  # and tandem-admin's
    assert lost and lost[0]["node_up"] is False and lost[0]["summary"].endswith("node down")
    print(f"failover took {failover_s:.1f} s")
    # zone 1 comes back: its replica was recorded out of sync, and is repaired from the
    # others; its kubelet takes down what the moved pod left there
    cluster.heal(1)
    cluster.node(1).start()
    cluster.wait_ready()
    wait_for(lambda: not condition(cluster, vol.volume_id).abnormal, 60,
             "the returned replica back in sync",
             lambda: condition(cluster, vol.volume_id).message + "\n" + frontend_log(
                 cluster, 2, vol.volume_id))
    # only what changed while it was away went back: the writes since cover 8 MiB of the
    # 64 (and the first writer's in-flight regions); a full copy would be all of it
    copies = [int(n) for rid, n in re.findall(
        r"resync of (\S+) copied (\d+) regions", frontend_log(cluster, 2, vol.volume_id,
                                                                tail=1 << 20)) if "z1" in rid]
    assert copies and copies[-1] * REGION_BYTES <= SIZE // 2, frontend_log(
        cluster, 2, vol.volume_id)
    old = cluster.node(1).stubs().node
    old.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=first.target))
    old.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=first.staging))
    second.down()
    delete(cluster, vol.volume_id)


def test_the_frontend_outlives_its_agent_restarted_in_a_new_mount_namespace(cluster):
    """The node plugin's container restarts (an upgrade, a crash): the volume's frontend
    keeps serving the pod meanwhile, and the new agent, in a new mount namespace, adopts
    it and takes the volume down when the pod goes."""
    vol = create(cluster, "mirrored-agent-restart", preferred_zone=3)
    a = Attached(cluster, vol, 3)
    kubelet = os.path.dirname(os.path.dirname(a.staging))
    # the kubelet's directory reaches the driver's container with Bidirectional propagation
    subprocess.run(["mount", "--bind", kubelet, kubelet], check=True)
    try:
        subprocess.run(["mount", "--make-shared", kubelet], check=True)
        dev = a.up()
        before = cluster.store().get(f"frontend/{vol.volume_id}")
        assert before is not None and before.value["state"] == "serving"
        # fio verify, as a pod would run it: every block written (flushed every 16
        # writes) is read back and checked once the writes end, after the restart
        fio = subprocess.Popen(
            ["fio", "--name=across-agent-restart", f"--filename={dev}", "--rw=randwrite",
             "--bs=4k", "--direct=1", "--ioengine=psync", "--size=24m", "--rate_iops=400",
             "--fsync=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
             "--verify_state_save=0",  # else a state file lands in the cwd
             "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        writer = VerifiedWriter(dev, blocks=2048, threads=1, fsync_every=16,
                                first_block=8192).start()  # beside fio: counts writes
        try:
            writer.wait_writes(100)
            cluster.node(3).kill()  # the agent only: its data path stays
            writer.wait_writes(200)  # the pod's I/O goes on without it
            cluster.node(3).start(wrap=("unshare", "--mount", "--propagation", "unchanged"))
            writer.wait_writes(100)
            assert fio.poll() is None, "fio ended before the new agent was up"
            out, err = fio.communicate(timeout=120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
            writer.stop()
        assert fio.returncode == 0, err
        job = json.loads(out)["jobs"][0]
        assert job["error"] == 0 and job["write"]["total_ios"] >= 6144, job
        assert job["read"]["total_ios"] >= 6144  # the verify pass read everything back
        assert writer.errors == []
        assert writer.verify(dev, direct=True) == []
        after = cluster.store().get(f"frontend/{vol.volume_id}")
        assert after is not None and after.value["state"] == "serving"
        assert after.value.get("pid") == before.value.get("pid")  # the same frontend
        a.down()  # through the new agent
        assert not os.path.exists(a.target)
        got = cluster.store().get(f"frontend/{vol.volume_id}")
        assert got is not None and got.value["state"] == "stopped"
        delete(cluster, vol.volume_id)
    finally:
        subprocess.run(["umount", "--lazy", kubelet], check=False)


def test_a_dead_data_path_is_restarted_by_its_agent(cluster):
    """The frontend's worker and the replica service die on their own (a bug, the OOM
    killer) while the agent lives: it restarts them, and the pod's I/O goes on."""
    vol = create(cluster, "mirrored-supervised", preferred_zone=2)
    a = Attached(cluster, vol, 2)
    dev = a.up()
    writer = VerifiedWriter(dev, blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(100)
    state = cluster.node(2).state_dir
    for pid_file in (f"frontends/{vol.volume_id}/worker.pid", "pool/replicas/service.pid"):
        with open(os.path.join(state, pid_file)) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid_file, old=pid: _pid(state, p) not in (0, old), 30,
                 f"{pid_file} restarted", cluster.logs)
        writer.wait_writes(200, timeout_s=60)
    writer.stop()
    assert writer.errors == []
    assert writer.verify(dev, direct=True) == []
    wait_for(lambda: not condition(cluster, vol.volume_id).abnormal, 60,
             "the restarted replica back in sync",
             lambda: condition(cluster, vol.volume_id).message)
    a.down()
    delete(cluster, vol.volume_id)


def _pid(state_dir: str, pid_file: str) -> int:
    try:
        with open(os.path.join(state_dir, pid_file)) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_a_replica_away_too_long_is_replaced_and_rebuilt(cluster):
    """Two replicas in zones 1 and 2, the pod in zone 1; zone 2 goes for longer than
    --replica-replace-after: a new replica in zone 3 is built from the one in zone 1 while
    the pod writes, and the old one's storage goes when zone 2 returns."""
    for ctl in cluster.controllers:  # this test's replacement delay
        ctl.stop()
        ctl.start(args=("--replica-replace-after", "4"))
    cluster.wait_leader()
    req_zones = {"replicas": "2", "remoteAccess": "true"}
    req = csi_pb2.CreateVolumeRequest(
        name="mirrored-healing", capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[BLOCK], parameters=req_zones)
    req.accessibility_requirements.preferred.append(cluster.zone_segments(1))
    req.accessibility_requirements.preferred.append(cluster.zone_segments(2))
    for z in range(1, cluster.zones + 1):
        req.accessibility_requirements.requisite.append(cluster.zone_segments(z))
    vol = cluster.controller(0).stubs().controller.CreateVolume(req).volume
    holders = {r["node_id"] for r in
               cluster.store().get(f"volume/{vol.volume_id}").value["replicas"]}
    if holders != {"node-z1", "node-z2"}:
        pytest.fail(f"placement chose {holders}, the test needs zones 1 and 2")
    a = Attached(cluster, vol, 1)
    dev = a.up()
    writer = VerifiedWriter(dev, blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(200)
    cluster.node(2).kill()
    cluster.node(2).kill_data_path()
    cluster.cut(2)

    def replaced() -> bool:
        got = cluster.store().get(f"volume/{vol.volume_id}").value
        return {r["node_id"] for r in got["replicas"]} == {"node-z1", "node-z3"}
    wait_for(replaced, 60, "the replica in zone 2 replaced", cluster.logs)
    wait_for(lambda: not condition(cluster, vol.volume_id).abnormal, 90,
             "the new replica rebuilt", lambda: condition(cluster, vol.volume_id).message
             + "\n" + frontend_log(cluster, 1, vol.volume_id))
    writer.stop()
    assert writer.errors == []
    assert writer.verify(dev, direct=True) == []
    a.down()
    # the new replica's own bytes hold every acknowledged block
    rebuilt = os.path.join(cluster.node(3).pool_dir, "replicas", vol.volume_id, "data")
    assert writer.verify(rebuilt) == []
    # zone 2 returns: its retired replica's storage goes
    cluster.heal(2)
    cluster.node(2).start()
    wait_for(lambda: not os.path.exists(os.path.join(
        cluster.node(2).pool_dir, "replicas", vol.volume_id)), 60,
        "the retired replica's storage removed", cluster.logs)
    delete(cluster, vol.volume_id)


def test_io_goes_on_without_etcd_quorum_until_a_replica_must_be_dropped(cluster):
    """Two of the three etcd members die: no lease renewal gets through, yet the volume's
    I/O goes on for three lease TTLs (the frontend serves on its replicas' word: no
    takeover can have happened). Then a replica's service dies: dropping it needs the
    arbiter (etcd), so writes fail (EIO) within TTL - margin while reads go on. The
    members return: the drop is recorded, writes are acknowledged again by the same
    frontend (no re-stage), its lease is renewed, and nothing acknowledged was lost.
    (Before: the frontend fenced itself TTL - margin after the members died.)"""
    vol = create(cluster, "mirrored-no-quorum", preferred_zone=2)
    a = Attached(cluster, vol, 2)
    dev = a.up()
    before = cluster.store().get(f"frontend/{vol.volume_id}")
    assert before is not None and before.value["state"] == "serving"
    ttl, margin = cluster.frontend_lease_ttl_s, cluster.fence_margin_s
    writer = VerifiedWriter(dev, blocks=2048, threads=2, fsync_every=16).start()
    writer.wait_writes(100)
    lost = (0, 2)  # zone 2's member stays: it has no leader
    for k in lost:
        cluster.etcd.kill(k)
    try:
        time.sleep(3 * ttl)
        assert writer.errors == [], frontend_log(cluster, 2, vol.volume_id)
        assert writer.acks_after(time.monotonic() - 1.0) > 0, "writes stopped"
        # a replica must be dropped: the arbiter cannot record it
        killed_at = time.monotonic()
        os.kill(_pid(cluster.node(3).state_dir, "pool/replicas/service.pid"), signal.SIGKILL)
        wait_for(lambda: writer.errors, ttl - margin + 3, "writes failing",
                 lambda: frontend_log(cluster, 2, vol.volume_id))
        failing_after = time.monotonic() - killed_at
        time.sleep(1.0)
        stalled_at = time.monotonic()
        time.sleep(1.0)
        assert writer.acks_after(stalled_at) == 0, "a write acknowledged without the arbiter"
        assert not read_fails(dev), "reads stopped too"
        assert "serving on the word of" in frontend_log(cluster, 2, vol.volume_id, 10**6)
    finally:
        for k in lost:
            cluster.etcd.members[k].start()
    cluster.etcd.wait_healthy()
    back_at = time.monotonic()
    wait_for(lambda: writer.acks_after(back_at) > 100, 30, "writes acknowledged again",
             lambda: frontend_log(cluster, 2, vol.volume_id))
    writer.stop()
    wait_for(lambda: "etcd renewed the lease again" in frontend_log(
        cluster, 2, vol.volume_id, 10**6), 15, "the lease renewed",
        lambda: frontend_log(cluster, 2, vol.volume_id))
    after = cluster.store().get(f"frontend/{vol.volume_id}")
    assert after is not None and after.value["state"] == "serving"
    assert after.value["pid"] == before.value["pid"]  # the same frontend all along
    assert writer.verify(dev, direct=True) == []  # nothing acknowledged was lost
    print(f"writes failed {failing_after:.1f} s after the replica died")
    cluster.wait_ready()
    wait_for(lambda: not condition(cluster, vol.volume_id).abnormal, 60,
             "the restarted replica back in sync",
             lambda: condition(cluster, vol.volume_id).message)
    a.down()
    delete(cluster, vol.volume_id)


def read_fails(dev: str) -> bool:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], 0)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
