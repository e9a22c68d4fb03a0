"""The NVMe backend on QEMU's emulated NVMe controller, in one boot of the tests/vm guest.

This machine's kernel has no NVMe driver at all; the guest (Debian's 6.1 kernel, nvme-core
and nvme loaded from its initramfs) gets an nvme-subsys with one controller and five
namespaces declared detached (tests/vm/nvme_guest.py SETUP). The guest job records facts;
the assertions are here. What is real: nvme-cli discovery and statuses, attach/detach,
devices found by NQN + NSID in sysfs, I/O with data verified, io.max on a namespace's
device with fio held at the limit, the driver's CSI calls in pool mode end to end, the
wipe before reuse, the store rebuilt from labels, and manage mode refused at start-up
(QEMU answers create-ns with Invalid Command Opcode). The create-ns/delete-ns path runs
against recorded outputs in tests/unit/test_nvme_backend.py.

About 60-90 s under TCG. Needs root (QEMU's 9p export of /, the initramfs cache). A guest
that cannot be built or booted FAILS these tests, with the reason.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from tests.support import REPO
from tests.vm import guest
from tests.vm.nvme_guest import CAPPED_IOPS, MARKER, MEASURE_NSID, NQN, POOL_NSIDS, SETUP

GUEST_TIMEOUT_S = 120.0  # stretched 3 times under TCG by guest.run
TOLERANCE = 0.2


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.fail("needs root: QEMU exports / over 9p, the guest caches in /var/cache")
    try:
        result = guest.run([sys.executable, "-m", "tests.vm.nvme_guest"], cwd=REPO,
                           share=[sys.prefix], timeout_s=GUEST_TIMEOUT_S, nvme=SETUP)
    except guest.GuestUnavailable as e:
        pytest.fail(f"the QEMU guest with NVMe could not run: {e}", pytrace=False)
    lines = [ln for ln in result.output.splitlines() if ln.startswith(MARKER)]
    if not lines:
        pytest.fail(f"the guest ({result.accel}) printed no result; exit {result.returncode}, "
                    f"output:\n{result.output[-4000:]}\nconsole:\n{result.console[-2000:]}",
                    pytrace=False)
    doc: dict[str, Any] = json.loads(lines[-1][len(MARKER):])
    doc["guest"] = {"accel": result.accel, "wall_s": result.wall_s, "boot_s": result.boot_s,
                    "returncode": result.returncode, "log": result.output}
    print(f"\nNVMe guest: {result.accel}, {result.wall_s:.1f} s in all, job {doc['run_s']:.1f} s")
    return doc


def need(facts: dict[str, Any], *keys: str) -> Any:
    value: Any = facts
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            pytest.fail(f"the guest did not get as far as {'.'.join(keys)}: "
                        f"{facts.get('error') or 'no error recorded'}\n"
                        f"{facts['guest']['log'][-3000:]}", pytrace=False)
        value = value[key]
    return value


def test_guest_ran_cleanly(facts):
    assert "error" not in facts, facts["error"]
    assert facts["guest"]["returncode"] == 0, facts["guest"]["log"][-3000:]
    assert facts["cleanup_problems"] == []


def test_discovery_and_namespace_management_refused_at_start_up(facts):
    ctrl = need(facts, "controller")
    assert ctrl["model"].startswith("QEMU NVMe")
    # QEMU advertises Namespace Management (OACS bit 3) ...
    assert ctrl["advertises_ns_management"] is True
    # ... and answers it with Invalid Command Opcode: the probe sees it, create-ns too
    assert need(facts, "ns_management_probe") == [0, 1]
    create = need(facts, "create_ns")
    assert "Precondition" in create["class"] and create["status"] == [0, 1]
    assert "(0x4001)" in facts["raw"]["create-ns"]["stderr"]
    refused = need(facts, "manage_open")
    assert "Precondition" in refused["class"]
    assert "Invalid Command Opcode" in refused["message"]
    assert "--nvme-namespaces pool" in refused["message"]
    assert set(need(facts, "pool_ids")) == {str(n) for n in (*POOL_NSIDS, MEASURE_NSID)}


def test_attach_detach_by_nqn_and_nsid_with_classified_statuses(facts):
    out = need(facts, "attach_detach")
    assert out["first"] is True and out["again"] is False
    assert out["raw_again"]["rc"] != 0 and "(0x4118)" in out["raw_again"]["stderr"]
    # found by NSID: the kernel named NSID 3 after the order it found it
    assert out["device"]["nsid"] == 3
    assert out["device"]["name"] != "nvme0n3", "the name happens to match; the test shows less"
    assert out["device"]["size"] == SETUP.namespaces_mib[2] * 1024 * 1024
    assert out["data_verified"] is True
    assert out["detach"] is True and out["detach_again"] is False
    assert "(0x411a)" in out["raw_detach_again"]["stderr"]
    missing = out["attach_missing"]
    assert "NotFound" in missing["class"] and missing["status"] == [0, 2]
    assert "(0x4002)" in out["raw_attach_missing"]["stderr"]
    bad = out["attach_bad_controller"]
    assert "Precondition" in bad["class"] and bad["status"] == [1, 0x1C]


def test_csi_end_to_end_in_pool_mode(facts):
    csi = need(facts, "csi")
    assert csi["iops_capacity"] > 0, "measured on the reserved namespace"
    assert csi["max_volumes_per_node"] == len(POOL_NSIDS)
    assert csi["blk_repeat_same"] is True
    # the smallest free namespace that fits: 32 MiB in NSID 1 (48), 64 MiB in NSID 2 (96)
    assert (csi["blk_nsid"], csi["fs_nsid"]) == (1, 2)
    assert csi["blk_ns_attached"] is True
    assert csi["blk_data_verified"] is True
    assert csi["ro_write"] != "allowed" and csi["ro_reads_same"] is True
    assert csi["blk_stats_abnormal"] is False
    # the filesystem stops before the label, which still names the volume
    assert csi["fs_bytes"] <= 64 * 1024 * 1024
    assert csi["fs_label"]


def test_io_max_on_the_namespace_device(facts):
    csi = need(facts, "csi")
    dev = csi["blk_device"]["dev"]
    line = next((ln for ln in csi["io_max"].splitlines() if ln.startswith(dev + " ")), "")
    assert f"riops={CAPPED_IOPS}" in line and f"wiops={CAPPED_IOPS}" in line, csi["io_max"]
    measured = csi["capped_read_iops"]
    assert abs(measured / CAPPED_IOPS - 1) <= TOLERANCE, measured
    assert dev not in csi["io_max_after_unpublish"]


def test_what_namespaces_cannot_do_is_refused(facts):
    csi = need(facts, "csi")
    for what in ("snapshot", "clone", "expand"):
        assert csi[what]["code"] == "FAILED_PRECONDITION", (what, csi[what])
        assert "NVMe" in csi[what]["message"] or "namespace" in csi[what]["message"]
    assert csi["size_after_refused_expand"] == 32 * 1024 * 1024
    assert "Precondition" in csi["replica_directory"]["class"]


def test_delete_wipes_and_detaches_and_the_pool_runs_out_cleanly(facts):
    csi = need(facts, "csi")
    assert csi["blk_ns_attached_after_delete"] is False
    assert csi["blk_ns_state_after_delete"] == "free"
    assert csi["again_nsid"] == csi["blk_nsid"]
    assert csi["again_reads_zero"] is True, "the next tenant must not read the last one's data"
    assert csi["exhausted"]["code"] == "RESOURCE_EXHAUSTED"


def test_lost_store_rebuilt_from_labels(facts):
    csi = need(facts, "csi")
    assert csi["rebuilt"] is True
    assert csi["fs_sha_after_rebuild"] == csi["fs_sha"]
    assert set(csi["final_states"].values()) == {"free"}
    assert csi["final_attached"] == []
    assert NQN.startswith("nqn.2019-08.org.qemu:")
