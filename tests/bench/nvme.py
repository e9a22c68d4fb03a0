"""Benchmark: NVMe namespace volumes against loop volumes on the same emulated controller.

    python -m tests.bench.nvme            # as root: boots the tests/vm guest, runs there

In one boot of the guest (QEMU's emulated NVMe: NSIDs 1-5 a pool of namespaces, NSID 6 an
XFS reflink filesystem holding a loop-backend pool), through the real drivers' CSI calls:
- 4 KiB random read and random write IOPS (fio, direct, iodepth 16, 4 s after a 1 s ramp)
  on a published block volume of each backend;
- create and delete latency per volume (CreateVolume/DeleteVolume, CSI round trip), each
  backend ROUNDS times.
Under TCG (this machine) the absolute figures mean nothing; the ratios are the result.
The last line is JSON with at least ns_over_loop_randread, ns_over_loop_randwrite and
ns_create_s_p50. Takes about 2 to 3 minutes under TCG (boot ~10 s, the two drivers' start,
four fio runs of 5 s, 2 x ROUNDS create/delete cycles).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from tests.vm.guest import NvmeSetup

MARKER = "NVME-BENCH "
MIB = 1024 * 1024
SUBSYS = "tandem-nvme-bench"
NQN = "nqn.2019-08.org.qemu:" + SUBSYS
POOL_NSIDS = (1, 2, 3, 4, 5)
LOOP_POOL_NSID = 6
SETUP = NvmeSetup(nqn=SUBSYS, namespaces_mib=(160, 160, 160, 160, 160, 1024))
VOLUME_BYTES = 128 * MIB
ROUNDS = 5


def guest_main() -> dict[str, Any]:
    from csi.config import Config
    from engine import command
    from engine.nvme import backend as nvme
    from engine.nvme.cli import NvmeCli
    from engine.nvme.sysfs import NvmeSysfs
    from engine.qos import fio
    from proto import csi_pb2
    from tests.integration.helpers import capability
    from tests.support import InProcessDriver

    root = "/tmp/bench"
    os.makedirs(root, exist_ok=True)
    out: dict[str, Any] = {"kernel": os.uname().release}

    def run_driver(config: Config, label: str) -> None:
        d = InProcessDriver(config)
        try:
            s = d.stubs
            creates, deletes = [], []
            for i in range(ROUNDS):
                t0 = time.monotonic()
                vol = s.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name=f"lat-{i}", capacity_range=csi_pb2.CapacityRange(
                        required_bytes=VOLUME_BYTES),
                    volume_capabilities=[capability(True)])).volume
                creates.append(time.monotonic() - t0)
                t0 = time.monotonic()
                s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
                deletes.append(time.monotonic() - t0)
            out[f"{label}_create_s_p50"] = statistics.median(creates)
            out[f"{label}_delete_s_p50"] = statistics.median(deletes)
            vol = s.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name="fio", capacity_range=csi_pb2.CapacityRange(required_bytes=VOLUME_BYTES),
                volume_capabilities=[capability(True)])).volume
            staging, target = f"{root}/{label}-st", f"{root}/{label}-pub/dev"
            s.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging,
                volume_capability=capability(True)))
            s.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
                volume_capability=capability(True)))
            # written once over, so reads hit allocated blocks on both backends
            command.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M",
                         f"count={VOLUME_BYTES // MIB}", "oflag=direct", "status=none"],
                        timeout_s=600)
            for rw in ("randread", "randwrite"):
                res = fio.run(fio.FioJob(target, rw, runtime_s=4, ramp_s=1, iodepth=16,
                                         size_bytes=VOLUME_BYTES, name=f"{label}-{rw}"))
                out[f"{label}_{rw}_iops"] = res.read_iops if rw == "randread" else res.write_iops
            s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=target))
            s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging))
            s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        finally:
            d.close()

    run_driver(Config(
        endpoint=f"unix://{root}/nvme.sock", node_id="bench", state_dir=f"{root}/nvme-state",
        overcommit_ratio=1.0, node_iops_capacity=100_000, backend="nvme",
        nvme=nvme.NvmeConfig(NQN, nvme.POOL, pool_nsids=POOL_NSIDS, node_id="bench")), "ns")

    # the loop backend's pool: XFS with reflink on a namespace of the same controller
    sysfs = NvmeSysfs()
    ctrl = sysfs.controller(NQN)
    cli = NvmeCli(sysfs.controller_dev(ctrl))
    cli.attach_ns(LOOP_POOL_NSID, ctrl.cntlid)
    cli.rescan()
    dev = sysfs.wait_namespace(NQN, LOOP_POOL_NSID, 30.0)
    pool_dir = f"{root}/loop-pool"
    os.makedirs(pool_dir, exist_ok=True)
    command.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev.path], timeout_s=300)
    command.run(["mount", "-o", "noatime", dev.path, pool_dir])
    try:
        run_driver(Config(
            endpoint=f"unix://{root}/loop.sock", node_id="bench", state_dir=f"{root}/loop-state",
            pool_dir=pool_dir, node_iops_capacity=100_000), "loop")
    finally:
        command.run(["umount", pool_dir], check=False)
        cli.detach_ns(LOOP_POOL_NSID, ctrl.cntlid)
    out["ns_over_loop_randread"] = out["ns_randread_iops"] / out["loop_randread_iops"]
    out["ns_over_loop_randwrite"] = out["ns_randwrite_iops"] / out["loop_randwrite_iops"]
    out["ns_over_loop_create_s_p50"] = out["ns_create_s_p50"] / out["loop_create_s_p50"]
    return out


def main() -> int:
    if os.environ.get("TANDEM_IN_GUEST") == "1":
        t0 = time.monotonic()
        result = guest_main()
        result["guest_run_s"] = time.monotonic() - t0
        print(MARKER + json.dumps(result, sort_keys=True), flush=True)
        return 0
    from tests.support import REPO
    from tests.vm import guest

    t0 = time.monotonic()
    res = guest.run([sys.executable, "-m", "tests.bench.nvme"], cwd=REPO, share=[sys.prefix],
                    timeout_s=400, nvme=SETUP, memory_mib=1536)
    lines = [ln for ln in res.output.splitlines() if ln.startswith(MARKER)]
    if not lines:
        print(res.output[-5000:], file=sys.stderr)
        return 1
    doc = json.loads(lines[-1][len(MARKER):])
    doc.update(accel=res.accel, guest_wall_s=round(res.wall_s, 1),
               total_s=round(time.monotonic() - t0, 1))
    doc = {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(doc.items())}
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
