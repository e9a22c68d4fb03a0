"""Limit values, rule files (v1 and v2 formats) and the budget split (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import InvalidSpec
from engine.qos import limits
from engine.qos.limits import IoLimits, IopsCap, check_device, effective_limits
from engine.qos.split import split_budget
from engine.qos.tiers import DEFAULT_TIERS, QosSpec


def test_limits_from_a_tier_convert_mb_to_bytes() -> None:
    gold = DEFAULT_TIERS["gold"]
    got = IoLimits.from_spec(gold)
    assert got == IoLimits(20000, 20000, 800 * 1_000_000, 800 * 1_000_000)
    assert IoLimits.from_spec(QosSpec()).unlimited


def test_a_cap_lowers_only_iops_and_never_raises() -> None:
    spec = QosSpec(max_read_iops=1000, max_write_iops=0, max_read_mbps=10)
    assert effective_limits(spec, None) == IoLimits(1000, 0, 10_000_000, 0)
    assert effective_limits(spec, IopsCap(400, 300)) == IoLimits(400, 300, 10_000_000, 0)
    assert effective_limits(spec, IopsCap(5000, 0)) == IoLimits(1000, 0, 10_000_000, 0)


@pytest.mark.parametrize("bad", [(-1, 0), (7, -2), (7.0, 1), (True, 1), (7,), "7:3", None])
def test_devices_must_be_major_minor_integers(bad: object) -> None:
    with pytest.raises(InvalidSpec):
        check_device(bad)


def test_io_max_line_uses_max_for_unlimited() -> None:
    line = limits.format_io_max((7, 3), IoLimits(500, 0, 1_000_000, 0))
    assert line == "7:3 riops=500 wiops=max rbps=1000000 wbps=max"


def test_v2_round_trip_on_a_fake_file(tmp_path: Path) -> None:
    (tmp_path / "io.max").write_text("")
    limits.write_v2(str(tmp_path), (7, 3), IoLimits(500, 600, 0, 700))
    assert limits.read_v2(str(tmp_path)) == {(7, 3): IoLimits(500, 600, 0, 700)}


def test_v1_writes_one_rule_per_file_and_zero_removes(tmp_path: Path) -> None:
    for name in limits.V1_FILES.values():
        (tmp_path / name).write_text("")
    limits.write_v1(str(tmp_path), (7, 3), IoLimits(500, 600, 1000, 0))
    assert (tmp_path / "blkio.throttle.read_iops_device").read_text() == "7:3 500\n"
    assert (tmp_path / "blkio.throttle.write_bps_device").read_text() == "7:3 0\n"
    assert limits.read_v1(str(tmp_path), (7, 3)) == IoLimits(500, 600, 1000, 0)
    limits.write_v1(str(tmp_path), (7, 3), IoLimits())
    assert limits.read_v1(str(tmp_path), (7, 3)).unlimited


def test_missing_rule_file_is_cgroup_gone(tmp_path: Path) -> None:
    with pytest.raises(limits.CgroupGone):
        limits.write_v1(str(tmp_path / "absent"), (7, 3), IoLimits(1))


@pytest.mark.parametrize(
    "budget, activity, expected",
    [
        (0, [True, False], [0, 0]),  # unlimited stays unlimited everywhere
        (1000, [], []),
        (1000, [None], [1000]),
        (1000, [True, True], [500, 500]),
        (1000, [False, False, False], [333, 333, 333]),  # nobody busy: equal shares
        (1000, [None, None], [500, 500]),  # new members count as active
        (1000, [False, True], [5, 995]),  # e.g. the pause container and the app
        (1000, [False, None, True], [5, 497, 497]),
        (2, [True, True, True], [1, 1, 1]),  # never a 0 share, which would mean unlimited
    ],
)
def test_split_budget(budget: int, activity: list[bool | None], expected: list[int]) -> None:
    assert split_budget(budget, activity) == expected


def test_split_never_exceeds_the_budget_when_shares_stay_above_one() -> None:
    for n in range(1, 40):
        for n_active in range(n + 1):
            activity = [True] * n_active + [False] * (n - n_active)
            for budget in (100, 1000, 20000):
                shares = split_budget(budget, activity)
                assert all(s >= 1 for s in shares)
                if budget >= 2 * n:
                    assert sum(shares) <= budget, (budget, activity, shares)
