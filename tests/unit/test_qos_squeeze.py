"""The squeeze control law with synthetic samples, and its loop on a fake tree (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.qos.limits import IoLimits, IopsCap, read_v2
from engine.qos.squeeze import SqueezeConfig, SqueezeController, SqueezeLoop, VolumeSample
from engine.qos.throttle import QosEnforcer
from engine.qos.tiers import QosSpec

GUARANTEED = QosSpec("g", min_read_iops=1000, min_write_iops=0, max_read_iops=0)
NOISY = QosSpec("n")  # no minimum, no maximum
CAPPED_NOISY = QosSpec("cn", max_read_iops=8000, max_write_iops=8000)
SPECS = {"g": GUARANTEED, "n": NOISY}


def busy(read_iops: float, write_iops: float = 0.0, q: float = 1.0) -> VolumeSample:
    return VolumeSample(read_iops, write_iops, q, q)


def idle() -> VolumeSample:
    return VolumeSample(0.0, 0.0, 0.0, 0.0)


def test_nothing_happens_without_a_guaranteed_volume_in_need() -> None:
    c = SqueezeController()
    assert c.step({"g": idle(), "n": busy(50000)}, SPECS) == {}
    assert c.step({"g": busy(5000), "n": busy(50000)}, SPECS) == {}  # g is healthy
    # g runs below its minimum but at its own pace (near-empty queue): content, no squeeze.
    assert c.step({"g": VolumeSample(300, 0, 0.05, 0), "n": busy(50000)}, SPECS) == {}


def test_starved_guaranteed_squeezes_the_burster_until_it_recovers() -> None:
    c = SqueezeController()
    # g gets 400 of its 1000 while n bursts: n is capped at 70% of what it did.
    assert c.step({"g": busy(400), "n": busy(20000, 10000)}, SPECS) == {"n": IopsCap(14000, 7000)}
    # Still starved: tighten again, from the measured rate, never above the current cap.
    assert c.step({"g": busy(700), "n": busy(14000, 7000)}, SPECS) == {"n": IopsCap(9800, 4900)}
    # Within the hold band (0.95..1.10 x min): caps stay.
    assert c.step({"g": busy(1000), "n": busy(9800, 4900)}, SPECS) == {}
    # Healthy: caps grow by a quarter each period...
    assert c.step({"g": busy(1200), "n": busy(9800, 4900)}, SPECS) == {"n": IopsCap(12250, 6125)}
    # ... and a direction whose cap stops binding loses it.
    assert c.step({"g": busy(1200), "n": busy(12250, 1000)}, SPECS) == {"n": IopsCap(15312, 0)}
    # g stops: every cap goes at once.
    assert c.step({"g": idle(), "n": busy(15312)}, SPECS) == {"n": None}
    assert c.caps == {}


def test_caps_never_go_below_the_floor_or_the_bursters_own_minimum() -> None:
    cfg = SqueezeConfig(floor_iops=50)
    c = SqueezeController(cfg)
    specs = {"g": GUARANTEED, "m": QosSpec("m", min_read_iops=600, min_write_iops=0)}
    changes = c.step({"g": busy(100), "m": busy(700, 60)}, specs)
    assert changes == {"m": IopsCap(600, 50)}
    # A volume at its own minimum is not bursting: left alone.
    c2 = SqueezeController(cfg)
    assert c2.step({"g": busy(100), "m": busy(640)}, specs) == {}


def test_relaxing_stops_at_the_tier_maximum() -> None:
    c = SqueezeController()
    specs = {"g": GUARANTEED, "cn": CAPPED_NOISY}
    assert c.step({"g": busy(100), "cn": busy(8000, 8000)}, specs) == {"cn": IopsCap(5600, 5600)}
    assert c.step({"g": busy(1500), "cn": busy(5600, 5600)}, specs) == {"cn": IopsCap(7000, 7000)}
    # Growing would pass the tier's own 8000: the cap goes, the tier limit rules again.
    assert c.step({"g": busy(1500), "cn": busy(7000, 7000)}, specs) == {"cn": None}


def test_unknown_queue_statistics_count_an_active_volume_as_wanting_more() -> None:
    c = SqueezeController()
    samples = {"g": VolumeSample(400, 0), "n": VolumeSample(20000, 0)}
    assert c.step(samples, SPECS) == {"n": IopsCap(14000, 50)}


def test_an_unpublished_volume_is_forgotten() -> None:
    c = SqueezeController()
    c.step({"g": busy(400), "n": busy(20000)}, SPECS)
    assert "n" in c.caps
    c.step({"g": busy(400)}, {"g": GUARANTEED})
    assert c.caps == {}


def test_starved_volumes_are_not_squeezed_themselves() -> None:
    c = SqueezeController()
    specs = {"g1": GUARANTEED, "g2": QosSpec("g2", min_read_iops=100), "n": NOISY}
    changes = c.step({"g1": busy(500), "g2": busy(2000), "n": busy(9000)}, specs)
    assert set(changes) == {"g2", "n"}  # g2 bursts above its own minimum: it gives too
    assert changes["g2"] == IopsCap(1400, 50)


# --- the loop, on a fake v2 tree ---------------------------------------------------------


def _cgroup(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "io.max").touch()
    (path / "io.stat").touch()
    return path


def _device(sys_root: Path, dev: tuple[int, int], reads: int, read_ticks_ms: int) -> None:
    d = sys_root / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{reads} 0 0 {read_ticks_ms} 0 0 0 0 0 0 0\n")


def test_loop_samples_the_kernel_and_caps_the_noisy_volume(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("io\n")
    sys_root = tmp_path / "sys"
    uid_g, uid_n = "aaaa-1", "bbbb-2"
    pod_g = _cgroup(root / "kubepods" / f"pod{uid_g}")
    pod_n = _cgroup(root / "kubepods.slice" / "kubepods-podbbbb_2.slice")
    enf = QosEnforcer(str(root), background=False)
    now = [100.0]
    loop = SqueezeLoop(enf, sys_root=str(sys_root), background=False, clock=lambda: now[0])
    try:
        enf.apply("g", uid_g, (7, 1), GUARANTEED)
        enf.apply("n", uid_n, (7, 2), NOISY)
        _device(sys_root, (7, 1), 0, 0)
        _device(sys_root, (7, 2), 0, 0)
        assert loop.step() == {}  # the first sample has no rate yet

        now[0] += 1.0
        (pod_g / "io.stat").write_text("7:1 rbytes=0 wbytes=0 rios=400 wios=0\n")
        (pod_n / "io.stat").write_text("7:2 rbytes=0 wbytes=0 rios=20000 wios=0\n")
        _device(sys_root, (7, 1), 400, 900)  # ~0.9 requests in flight: g wants more
        assert loop.step() == {"n": IopsCap(14000, 50)}
        assert read_v2(str(pod_n))[(7, 2)] == IoLimits(14000, 50)

        loop.close()  # stopping the loop gives the tier's limits back
        assert read_v2(str(pod_n)).get((7, 2), IoLimits()).unlimited
    finally:
        loop.close()
        enf.close()


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_config_is_plain_data(factor: float) -> None:
    cfg = SqueezeConfig(decrease_factor=factor)
    assert cfg.decrease_factor == factor
