"""Admission of guaranteed minima (control/policy.py) and the fio helpers (no root, fio not
run)."""

from __future__ import annotations

import json

import pytest

from control import policy as admission
from engine.errors import CommandFailed, InvalidSpec, OutOfCapacity
from engine.qos import fio
from engine.qos.tiers import DEFAULT_TIERS, QosSpec

GOLD, SILVER, BRONZE = DEFAULT_TIERS["gold"], DEFAULT_TIERS["silver"], DEFAULT_TIERS["bronze"]


def test_sums_and_headroom() -> None:
    specs = [GOLD, SILVER, BRONZE]  # 4000 + 1000 + 0
    assert admission.reserved_iops(specs) == 5000
    assert admission.headroom_iops(6000, specs) == 1000
    assert admission.headroom_iops(100, specs) == 0
    assert admission.reserved_iops([BRONZE, QosSpec()]) == 0  # no guarantees fit anywhere


def test_can_place_does_not_count_a_changing_volume_twice() -> None:
    placed = {"a": GOLD, "b": SILVER}  # 5000 reserved
    assert not admission.can_place(5500, placed, SILVER)
    assert admission.can_place(5500, placed, SILVER, volume_id="b")  # same tier again
    assert admission.can_place(5500, placed, SILVER, volume_id="a")  # gold -> silver frees room


def test_check_admission_tells_permanent_from_temporary() -> None:
    placed = {"a": GOLD}
    admission.check_admission(6000, placed, "b", SILVER)
    with pytest.raises(OutOfCapacity):  # fits once "a" leaves: RESOURCE_EXHAUSTED
        admission.check_admission(6000, placed, "b", QosSpec(min_read_iops=2500))
    with pytest.raises(InvalidSpec):  # never fits on this node: INVALID_ARGUMENT
        admission.check_admission(6000, {}, "b", QosSpec(min_read_iops=7000))
    admission.check_admission(6000, placed, "a", QosSpec(min_read_iops=6000))  # a tier change


def test_fio_argv_is_an_argument_list_with_direct_io() -> None:
    job = fio.FioJob("/dev/loop9", "randrw", runtime_s=1.5, iodepth=8, ramp_s=0.5, size_bytes=4096)
    argv = job.argv()
    assert argv[0] == "fio"
    assert "--direct=1" in argv and "--runtime=1.5s" in argv and "--ramp_time=0.5s" in argv
    assert "--rwmixread=50" in argv and "--size=4096" in argv and "--iodepth=8" in argv


def _fio_doc(read_iops: float, write_iops: float) -> str:
    job = {
        "read": {"iops": read_iops, "bw_bytes": read_iops * 4096},
        "write": {"iops": write_iops, "bw_bytes": write_iops * 4096},
    }
    return "fio: some warning\n" + json.dumps({"jobs": [job, job]})


def test_parse_fio_json_sums_jobs_and_skips_warnings() -> None:
    r = fio.parse_json(_fio_doc(100.0, 50.0))
    assert (r.read_iops, r.write_iops, r.iops) == (200.0, 100.0, 300.0)
    assert r.read_bytes_per_s == 200.0 * 4096


def test_fio_failure_is_command_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Done:
        stdout = "not json"

    monkeypatch.setattr(fio.command, "run", lambda argv, timeout_s: Done())
    with pytest.raises(CommandFailed):
        fio.run(fio.FioJob("/dev/null", "randread"))
