"""The node agent API is the node API: one script of calls against a real node (a
LocalNode on a real pool, loop devices and all) called directly, then the same script
through AgentClient -> mutual TLS -> AgentServer -> the same LocalNode. The transcripts,
results and domain errors alike, must be the same."""

from __future__ import annotations

import dataclasses
import os

from control.agent_client import AgentClient
from control.agent_server import AgentServer
from control.agent_tls import ReloadingTls, TlsFiles
from control.local_node import LocalNode
from control.node_api import (
    BLOCK,
    MOUNT,
    SOURCE_REPLICA,
    SOURCE_SNAPSHOT,
    SOURCE_VOLUME,
    BackupJob,
    NewVolume,
    RestoreJob,
    SnapshotMember,
    VolumeSource,
)
from engine.backup.targets import Credentials, ObjectStore, Target, Targets
from engine.errors import EngineError
from engine.node_volumes import StageRequest
from engine.qos.tiers import QosSpec
from tests import support
from tests.pki import CertificateAuthority

MIB = 1024 * 1024
TARGET = Target("offsite", "http://127.0.0.1:9", "bucket")  # nothing listens there


def normalized(value):
    """Results without what differs between two runs by nature (times, pool usage)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: normalized(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for volatile in ("created_at", "free_bytes"):
            if volatile in changes:
                changes[volatile] = 0
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        return tuple(normalized(v) for v in value)
    return value


def script(node, engine, root: str, p: str) -> list:
    """The calls, each recorded as (what, result) or (what, error class, message)."""
    transcript: list = []

    def do(what: str, call):
        try:
            result = normalized(call())
        except EngineError as e:
            transcript.append((what, type(e).__name__, str(e).replace(p, "<p>")))
            return None
        transcript.append((what, result))
        return result

    def vid(name: str) -> str:
        return f"vol-{p}{name}"

    gold = QosSpec("gold", 10, 10, 1000, 1000, 50, 50)
    spec = NewVolume(vid("a"), 64 * MIB, (BLOCK,), gold, VolumeSource(), 10)
    do("info", lambda: dataclasses.replace(node.info(), free_bytes=0, condition=None))
    do("create", lambda: node.create_volume(spec))
    do("create again", lambda: node.create_volume(spec))
    do("create, other size", lambda: node.create_volume(
        dataclasses.replace(spec, size_bytes=128 * MIB)))
    do("volume", lambda: node.volume(vid("a")))
    do("volume missing", lambda: node.volume(vid("missing")))
    do("volumes", lambda: node.volumes((vid("a"), vid("missing"))))
    do("expand", lambda: node.expand_volume(vid("a"), 96 * MIB, 11))
    do("expand stale", lambda: node.expand_volume(vid("a"), 128 * MIB, 5))
    do("expand smaller", lambda: node.expand_volume(vid("a"), 64 * MIB, 12))
    do("expand unaligned", lambda: node.expand_volume(vid("a"), 96 * MIB + 1, 12))
    do("expand missing", lambda: node.expand_volume(vid("missing"), 64 * MIB, 1))
    do("set qos", lambda: node.set_qos(vid("a"), QosSpec("bronze"), 12))
    do("set qos stale", lambda: node.set_qos(vid("a"), gold, 3))
    do("volume after", lambda: node.volume(vid("a")))
    snap = f"snap-{p}a"
    do("snapshot", lambda: node.create_snapshots((SnapshotMember(snap, vid("a")),)))
    do("snapshot again", lambda: node.create_snapshots((SnapshotMember(snap, vid("a")),)))
    do("snapshot id of another volume", lambda: node.create_snapshots(
        (SnapshotMember(snap, vid("b")),)))
    do("snapshot of a missing volume", lambda: node.create_snapshots(
        (SnapshotMember(f"snap-{p}x", vid("missing")),)))
    # backups: jobs refused before any bucket is reached
    store = ObjectStore(TARGET, Credentials("access", "secret", "k" * 32))
    elsewhere = ObjectStore(Target("offsite", "http://127.0.0.1:10", "bucket"),
                            store.credentials)
    do("start backup to a target defined otherwise here", lambda: node.start_backup(
        BackupJob(snap, "0" * 32, elsewhere)))
    do("start backup of a missing snapshot", lambda: node.start_backup(
        BackupJob(f"snap-{p}missing", "0" * 32, store)))
    do("backup status, no job", lambda: node.backup_status(snap))
    do("start restore into a missing volume", lambda: node.start_restore(
        RestoreJob(vid("missing"), "0" * 32, store)))
    do("restore status, no job", lambda: node.restore_status(vid("a")))
    do("get snapshot", lambda: node.snapshot(snap))
    do("get missing snapshot", lambda: node.snapshot(f"snap-{p}missing"))
    do("allocated", lambda: node.allocated_ranges(snap))
    do("allocated missing", lambda: node.allocated_ranges(f"snap-{p}missing"))
    do("changed", lambda: node.changed_ranges(snap, snap))
    do("restore", lambda: node.create_volume(NewVolume(
        vid("r"), 96 * MIB, (MOUNT,), QosSpec(), VolumeSource(SOURCE_SNAPSHOT, snap), 20)))
    do("clone", lambda: node.create_volume(NewVolume(
        vid("c"), 96 * MIB, (BLOCK,), QosSpec(), VolumeSource(SOURCE_VOLUME, vid("a")), 21)))
    do("restore of a missing snapshot", lambda: node.create_volume(NewVolume(
        vid("x"), 96 * MIB, (MOUNT,), QosSpec(), VolumeSource(SOURCE_SNAPSHOT,
                                                               f"snap-{p}missing"), 22)))
    # mirrored volumes' calls, on a node that serves no replicas and runs no frontends (the
    # cluster tests make them for real): the same refusals both ways
    do("copy of a volume that is no replica", lambda: node.create_volume(NewVolume(
        vid("y"), 96 * MIB, (BLOCK,), QosSpec(), VolumeSource(SOURCE_REPLICA, vid("a")), 22)))
    do("replica", lambda: node.replica(vid("a")))
    do("expand replica", lambda: node.expand_replica(vid("a"), 128 * MIB, 22))
    do("snapshot replica", lambda: node.snapshot_replica(f"snap-{p}m", vid("a")))
    do("barrier", lambda: node.barrier_frontend(vid("a"), f"snap-{p}m", 2.5))
    do("resume", lambda: node.resume_frontend(vid("a"), f"snap-{p}m"))
    do("frontend tier", lambda: node.set_frontend_qos(vid("a"), gold, 22))

    # staged (as the kubelet would, through the node's own engine): not deletable
    staging = os.path.join(root, f"staging-{p}")
    os.makedirs(staging)
    engine.volumes.stage(StageRequest(vid("a"), staging, BLOCK))
    do("volume staged", lambda: node.volume(vid("a")))
    do("delete staged", lambda: node.delete_volume(vid("a"), 13))
    do("group snapshot with a staged block volume", lambda: node.create_snapshots(
        (SnapshotMember(f"snap-{p}g1", vid("a")), SnapshotMember(f"snap-{p}g2", vid("c")))))
    engine.volumes.unstage(vid("a"), staging)

    def inventory():  # this run's objects (the node holds the other run's too)
        inv = node.inventory()
        return dataclasses.replace(
            inv, volumes=tuple(v for v in inv.volumes if p in v.volume_id),
            snapshots=tuple(s for s in inv.snapshots if p in s.snapshot_id))

    do("inventory", inventory)
    do("delete snapshot", lambda: node.delete_snapshot(snap))
    do("delete snapshot again", lambda: node.delete_snapshot(snap))
    do("delete stale", lambda: node.delete_volume(vid("a"), 2))
    for name, version in (("a", 13), ("r", 23), ("c", 24)):
        do(f"delete {name}", lambda n=name, v=version: node.delete_volume(vid(n), v))
    do("delete again", lambda: node.delete_volume(vid("a"), 13))
    # refused above, but their records stayed on the node for a retry: they go as any do
    do("delete the refused group's snapshots", lambda: (
        node.delete_snapshot(f"snap-{p}g1"), node.delete_snapshot(f"snap-{p}g2")))
    do("inventory at the end", inventory)
    return transcript


def rename(transcript: list, p: str) -> list:
    """Object IDs differ by their prefix only: make them comparable."""
    def swap(value):
        if isinstance(value, str):
            return value.replace(p, "<p>")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{f.name: swap(getattr(value, f.name))
                                                 for f in dataclasses.fields(value)})
        if isinstance(value, tuple):
            return tuple(sorted((swap(v) for v in value), key=repr))
        return value
    return [swap(entry) for entry in transcript]


def test_local_node_through_grpc_behaves_as_local_node(test_root):
    driver = support.InProcessDriver(support.test_config(test_root))
    ca = CertificateAuthority.create(os.path.join(test_root, "pki"))
    agent_pair, controller_pair = ca.issue("agent", dns=["tandem-agent"]), ca.issue("ctl")
    server = client = None
    try:
        engine = driver.driver.engine
        local = LocalNode(engine, 8, targets=Targets({"offsite": TARGET}))
        server = AgentServer(local, "127.0.0.1:0", ReloadingTls(
            TlsFiles(ca.cert_file, agent_pair.cert_file, agent_pair.key_file)))
        server.start()
        client = AgentClient(local.node_id, server.address, ReloadingTls(
            TlsFiles(ca.cert_file, controller_pair.cert_file, controller_pair.key_file)))
        direct = script(local, engine, test_root, "d0")
        remote = script(client, engine, test_root, "r0")
        assert len(direct) == len(remote) > 35
        for mine, theirs in zip(rename(direct, "d0"), rename(remote, "r0"), strict=True):
            assert mine == theirs
        # the script met the errors it was written for, on both paths
        errors = {entry[1] for entry in direct if len(entry) == 3}
        assert {"AlreadyExists", "StaleVersion", "OutOfRange", "InvalidSpec", "NotFound",
                "InUse", "Precondition"} <= errors, errors
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop(0)
        driver.close()
