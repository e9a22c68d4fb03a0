"""The NVMe backend for real, inside the QEMU guest of tests/vm/guest.py (one boot).

QEMU's emulated controller (hw/nvme, QEMU 7.2 here) in an nvme-subsys with namespaces
declared detached at start (SETUP). What it can do is done for real: discovery through
nvme-cli and sysfs, attach-ns/detach-ns and their NVMe statuses, the block devices found
by NQN + NSID, I/O with the data verified, a wipe before reuse, io.max on a namespace's
device, the CSI calls of the backend end to end through the real driver in pool mode, and
the store rebuilt from the labels. What it cannot (create-ns and delete-ns answer Invalid
Command Opcode) is checked as the start-up refusal it must cause; the create-ns path runs
in tests/unit/test_nvme_backend.py against recorded outputs.

Run only by tests/integration/test_nvme_guest.py (or by hand inside the guest): it prints
one line `MARKER{json}` of facts; the assertions are made on the host.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
import traceback
import uuid
from typing import Any

import grpc

from csi.config import Config
from engine import command
from engine.errors import EngineError
from engine.nvme import backend as nvme
from engine.nvme import label as labels
from engine.nvme.cli import NvmeCli
from engine.nvme.sysfs import NvmeSysfs
from engine.qos.fio import FioJob
from engine.qos.tiers import QosSpec
from engine.state import SqliteStore
from proto import csi_pb2
from tests.integration.helpers import capability
from tests.support import InProcessDriver
from tests.vm.guest import NvmeSetup
from tests.vm.qos_v2_guest import Lab, read, wait_fio

MARKER = "NVME-GUEST-FACTS "
MIB = 1024 * 1024
SUBSYS = "tandem-nvme"
NQN = "nqn.2019-08.org.qemu:" + SUBSYS  # QEMU prefixes the nqn= it is given
# NSIDs 1-4: the pool (sizes differ so the smallest fitting one is chosen); 5: reserved
# for measuring the IOPS capacity
SETUP = NvmeSetup(nqn=SUBSYS, namespaces_mib=(48, 96, 96, 160, 64))
POOL_NSIDS = (1, 2, 3, 4)
MEASURE_NSID = 5
CAPPED_IOPS = 250
TIERS = {"capped": QosSpec("capped", max_read_iops=CAPPED_IOPS, max_write_iops=CAPPED_IOPS)}
ENV = {**os.environ, "LC_ALL": "C"}


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


def raw(argv: list[str]) -> dict[str, Any]:
    """One nvme-cli call as it answered: exit status and output, recorded."""
    p = command.run(argv, check=False)
    return {"argv": argv, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def error_of(fn, *args) -> dict[str, Any]:
    try:
        fn(*args)
    except EngineError as e:
        status = getattr(e, "status", None)
        return {"class": [c.__name__ for c in type(e).__mro__],
                "status": list(status.key) if status else None, "message": str(e)}
    return {"class": None}


def rpc_error(call, req) -> dict[str, Any]:
    try:
        call(req)
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details()}
    return {"code": "OK"}


def discovery(facts: dict[str, Any], sysfs: NvmeSysfs) -> NvmeCli:
    ctrl = sysfs.controller(NQN)
    cli = NvmeCli(sysfs.controller_dev(ctrl))
    info = cli.id_ctrl()
    facts["controller"] = {"name": ctrl.name, "cntlid": ctrl.cntlid, "model": info.model,
                           "oacs": info.oacs, "nn": info.namespaces_max,
                           "advertises_ns_management": info.advertises_ns_management}
    probe = cli.probe_ns_management()
    facts["ns_management_probe"] = list(probe.key) if probe else None
    facts["create_ns"] = error_of(cli.create_ns, 8192, 0)
    facts["raw"] = {"create-ns": raw(["nvme", "create-ns", f"/dev/{ctrl.name}", "--nsze=8192",
                                      "--ncap=8192", "--flbas=0"])}
    # the manage mode refuses to start on this controller, saying why
    store = SqliteStore("/tmp/manage-state.sqlite")
    try:
        facts["manage_open"] = error_of(nvme.NvmeBackend(store, nvme.NvmeConfig(NQN)).open)
    finally:
        store.close()
    facts["pool_ids"] = {n: cli.id_ns(n).size_bytes for n in (*POOL_NSIDS, MEASURE_NSID)}
    return cli


def attach_detach(facts: dict[str, Any], cli: NvmeCli, sysfs: NvmeSysfs, cntlid: int) -> None:
    """NSID 3 alone: the kernel names its device after the order it found it, not the NSID."""
    out: dict[str, Any] = {"first": cli.attach_ns(3, cntlid)}
    cli.rescan()
    dev = sysfs.wait_namespace(NQN, 3, 30.0)
    out["device"] = {"name": dev.name, "nsid": dev.nsid, "size": dev.size_bytes,
                     "wwid": dev.wwid, "block": dev.block_bytes}
    out["again"] = cli.attach_ns(3, cntlid)
    out["raw_again"] = raw(["nvme", "attach-ns", cli.dev, "--namespace-id=3",
                            f"--controllers={cntlid}"])
    # I/O with the data verified, straight on the namespace
    data = os.urandom(4 * MIB)
    fd = os.open(dev.path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwritev(fd, [buf], 8 * MIB)
        os.fsync(fd)
        back = mmap.mmap(-1, len(data))
        os.preadv(fd, [back], 8 * MIB)
        out["data_verified"] = bytes(back) == data
    finally:
        os.close(fd)
    out["detach"] = cli.detach_ns(3, cntlid)
    cli.rescan()
    sysfs.wait_gone(NQN, 3, 30.0)
    out["detach_again"] = cli.detach_ns(3, cntlid)
    out["raw_detach_again"] = raw(["nvme", "detach-ns", cli.dev, "--namespace-id=3",
                                   f"--controllers={cntlid}"])
    out["attach_missing"] = error_of(cli.attach_ns, 99, cntlid)
    out["raw_attach_missing"] = raw(["nvme", "attach-ns", cli.dev, "--namespace-id=99",
                                     f"--controllers={cntlid}"])
    out["attach_bad_controller"] = error_of(cli.attach_ns, 3, cntlid + 7)
    # wipe what we wrote, so the pool adopts NSID 3 as blank
    cli.attach_ns(3, cntlid)
    cli.rescan()
    dev = sysfs.wait_namespace(NQN, 3, 30.0)
    subprocess.run(["blkdiscard", "-z", dev.path], check=True, env=ENV)
    cli.detach_ns(3, cntlid)
    cli.rescan()
    sysfs.wait_gone(NQN, 3, 30.0)
    facts["attach_detach"] = out


def volume_nsid(driver: InProcessDriver, volume_id: str) -> int:
    return nvme.nsid_of(driver.driver.engine.files.require(volume_id))


def create(stubs, name: str, size: int, block: bool, **kw) -> csi_pb2.Volume:
    return stubs.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[capability(block)], **kw)).volume


def read_back(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(size)


def csi_end_to_end(facts: dict[str, Any], root: str, lab: Lab) -> None:
    config = Config(endpoint=f"unix://{root}/csi.sock", node_id="node-nvme",
                    state_dir=f"{root}/state", zone="zone-a", overcommit_ratio=1.0,
                    default_volume_bytes=32 * MIB, tiers=TIERS, node_iops_capacity=0,
                    backend="nvme", nvme=nvme.NvmeConfig(
                        NQN, nvme.POOL, pool_nsids=POOL_NSIDS, measure_nsid=MEASURE_NSID,
                        node_id="node-nvme"))
    out: dict[str, Any] = {}
    facts["csi"] = out
    t0 = time.monotonic()
    d = InProcessDriver(config)
    try:
        out["start_s"] = time.monotonic() - t0
        engine = d.driver.engine
        out["iops_capacity"] = engine.iops_capacity
        s = d.stubs
        info = s.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        out["max_volumes_per_node"] = info.max_volumes_per_node
        out["capacity"] = s.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
        blk = create(s, "blk", 32 * MIB, True, parameters={"tier": "capped"})
        out["blk_repeat_same"] = create(s, "blk", 32 * MIB, True,
                                        parameters={"tier": "capped"}).volume_id == blk.volume_id
        out["blk_nsid"] = volume_nsid(d, blk.volume_id)
        fs = create(s, "fs", 64 * MIB, False)
        out["fs_nsid"] = volume_nsid(d, fs.volume_id)
        out["blk_ns_attached"] = engine.files.sysfs.namespace(NQN, out["blk_nsid"]) is not None

        # block: staged and published to a pod, io.max on the namespace's device
        uid = str(uuid.uuid4())
        _, pod = lab.kubelet_pod(uid)
        app = lab.container(pod, f"cri-containerd-{uuid.uuid4().hex}.scope")
        s.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=blk.volume_id, staging_target_path=f"{root}/st-blk",
            volume_capability=capability(True)))
        target = f"{root}/pods/{uid}/blk"
        pub = csi_pb2.NodePublishVolumeRequest(
            volume_id=blk.volume_id, staging_target_path=f"{root}/st-blk", target_path=target,
            volume_capability=capability(True),
            volume_context={"csi.storage.k8s.io/pod.uid": uid})
        s.node.NodePublishVolume(pub)
        s.node.NodePublishVolume(pub)  # repeated: nothing stacks
        ns = engine.files.sysfs.namespace(NQN, out["blk_nsid"])
        out["blk_device"] = {"name": ns.name, "dev": f"{ns.major}:{ns.minor}"}
        out["io_max"] = read(os.path.join(pod, "io.max"))
        job = FioJob(target, "randread", runtime_s=2, ramp_s=1, iodepth=16)
        out["capped_read_iops"] = wait_fio(lab.start_fio(app, job), job).read_iops
        data = os.urandom(4 * MIB)
        with open(target, "r+b", buffering=0) as f:
            f.seek(1 * MIB)
            f.write(data)
            os.fsync(f.fileno())
        out["blk_data_verified"] = read_back(target, 1 * MIB, len(data)) == data
        ro_target = f"{root}/pods/{uid}/blk-ro"
        s.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=blk.volume_id, staging_target_path=f"{root}/st-blk",
            target_path=ro_target, volume_capability=capability(True), readonly=True))
        try:
            with open(ro_target, "r+b", buffering=0) as f:
                f.write(b"x")
            out["ro_write"] = "allowed"
        except OSError as e:
            out["ro_write"] = e.strerror
        out["ro_reads_same"] = read_back(ro_target, 1 * MIB, len(data)) == data
        stats = s.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=blk.volume_id, volume_path=target))
        out["blk_stats_abnormal"] = stats.volume_condition.abnormal

        # what the device cannot do: refused, never faked
        out["snapshot"] = rpc_error(s.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            source_volume_id=blk.volume_id, name="snap"))
        out["clone"] = rpc_error(s.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="clone", capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MIB),
            volume_capabilities=[capability(True)],
            volume_content_source=csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=blk.volume_id))))
        out["expand"] = rpc_error(s.controller.ControllerExpandVolume,
                                  csi_pb2.ControllerExpandVolumeRequest(
                                      volume_id=blk.volume_id,
                                      capacity_range=csi_pb2.CapacityRange(
                                          required_bytes=40 * MIB)))
        got = s.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=blk.volume_id))
        out["size_after_refused_expand"] = got.volume.capacity_bytes
        out["replica_directory"] = error_of(engine.replica_directory)

        # mount: a filesystem that stops before the label
        s.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=fs.volume_id, staging_target_path=f"{root}/st-fs",
            volume_capability=capability(False)))
        fs_target = f"{root}/pods/{uid}/fs"
        s.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=fs.volume_id, staging_target_path=f"{root}/st-fs", target_path=fs_target,
            volume_capability=capability(False)))
        payload = os.urandom(3 * MIB)
        with open(f"{fs_target}/data.bin", "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
        out["fs_sha"] = hashlib.sha256(payload).hexdigest()
        st = os.statvfs(fs_target)
        out["fs_bytes"] = st.f_blocks * st.f_frsize
        fs_dev = engine.files.sysfs.namespace(NQN, out["fs_nsid"])
        out["fs_label"] = labels.read(fs_dev.path, fs_dev.size_bytes).volume_id

        # unpublish and unstage both; the block volume is deleted: wiped, labelled free
        for vid, tgt in ((blk.volume_id, target), (blk.volume_id, ro_target),
                         (fs.volume_id, fs_target)):
            s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vid, target_path=tgt))
        out["io_max_after_unpublish"] = read(os.path.join(pod, "io.max"))
        for vid, stg in ((blk.volume_id, "st-blk"), (fs.volume_id, "st-fs")):
            s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=f"{root}/{stg}"))
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=blk.volume_id))
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=blk.volume_id))
        out["blk_ns_attached_after_delete"] = (
            engine.files.sysfs.namespace(NQN, out["blk_nsid"]) is not None)
        out["blk_ns_state_after_delete"] = engine.files.ns_record(out["blk_nsid"]).state

        # the same namespace again, for another tenant: nothing of the last one is left
        again = create(s, "blk-again", 32 * MIB, True)
        out["again_nsid"] = volume_nsid(d, again.volume_id)
        dev = engine.files.sysfs.namespace(NQN, out["again_nsid"])
        out["again_reads_zero"] = not any(read_back(dev.path, 0, 8 * MIB))

        # fill the pool: the fifth volume finds no namespace
        more = [create(s, f"more-{i}", 32 * MIB, True).volume_id for i in range(2)]
        out["exhausted"] = rpc_error(s.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="one-too-many", capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MIB),
            volume_capabilities=[capability(True)]))
        for vid in [again.volume_id, *more]:
            s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    finally:
        d.close()

    # the node's store lost: the mapping comes back from the labels
    os.unlink(f"{root}/state/state.sqlite")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{root}/state/state.sqlite{suffix}"):
            os.unlink(f"{root}/state/state.sqlite{suffix}")
    d = InProcessDriver(config)
    try:
        s = d.stubs
        out["rebuilt"] = d.driver.engine.files.get(fs.volume_id) is not None
        s.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=fs.volume_id, staging_target_path=f"{root}/st-fs2",
            volume_capability=capability(False)))
        with open(f"{root}/st-fs2/data.bin", "rb") as f:
            out["fs_sha_after_rebuild"] = hashlib.sha256(f.read()).hexdigest()
        s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=fs.volume_id, staging_target_path=f"{root}/st-fs2"))
        s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=fs.volume_id))
        files = d.driver.engine.files
        out["final_states"] = {r.nsid: r.state for r in files.ns_records()}
        out["final_attached"] = sorted(n.nsid for n in files.sysfs.namespaces(NQN))
    finally:
        d.close()


def run(facts: dict[str, Any]) -> None:
    facts["kernel"] = os.uname().release
    facts["nvme_cli"] = command.run(["nvme", "version"]).stdout.strip()
    sysfs = NvmeSysfs()
    cli = discovery(facts, sysfs)
    attach_detach(facts, cli, sysfs, facts["controller"]["cntlid"])
    lab = Lab()
    root = "/tmp/nvme-csi"
    os.makedirs(root, exist_ok=True)
    try:
        csi_end_to_end(facts, root, lab)
    finally:
        facts["cleanup_problems"] = lab.cleanup()


def main() -> int:
    if os.environ.get("TANDEM_IN_GUEST") != "1":
        print("refusing to run outside the guest of tests/vm/guest.py: it attaches, wipes "
              "and detaches the NVMe namespaces it finds", file=sys.stderr)
        return 2
    facts: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        run(facts)
    except Exception:
        facts["error"] = traceback.format_exc()
        log(facts["error"])
    facts["run_s"] = time.monotonic() - t0
    print(MARKER + json.dumps(facts, sort_keys=True, default=str), flush=True)
    return 1 if "error" in facts else 0


if __name__ == "__main__":
    sys.exit(main())
