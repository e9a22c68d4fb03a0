"""Tiers on real loop devices and real cgroup v1 blkio, laid out like a kubelet's.

Needs root: without it these tests FAIL (a silently skipped storage test is worse than
none). Loads are fio, 4 KiB random I/O with direct I/O, in 1-2 s windows; the only timing
assertions are the throttle-accuracy checks (within 15%), which are the point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from engine.qos import limits
from engine.qos.fio import FioJob
from engine.qos.limits import Device, IopsCap
from engine.qos.squeeze import SqueezeConfig, SqueezeLoop
from engine.qos.stats import read_v1
from engine.qos.throttle import QosEnforcer
from engine.qos.tiers import QosSpec
from tests.bench.qos import BLKIO, MIB, Lab

TOLERANCE = 0.15


@pytest.fixture
def enforcer(lab: Lab) -> Iterator[QosEnforcer]:
    enf = lab.enforcer(rebalance_interval_s=0.25)
    try:
        yield enf
    finally:
        enf.close()


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def window_iops(cgroup_dir: str, device: Device, seconds: float) -> tuple[float, float]:
    """(read, write) IOPS of a cgroup and its children over a window, from the kernel."""
    before = read_v1(cgroup_dir, device, recursive=True)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = read_v1(cgroup_dir, device, recursive=True)
    dt = time.monotonic() - t0
    return (after.read_ios - before.read_ios) / dt, (after.write_ios - before.write_ios) / dt


def assert_near(measured: float, limit: int) -> None:
    assert abs(measured / limit - 1) <= TOLERANCE, f"measured {measured:.0f}, limit {limit}"


def test_this_machine_has_v1_blkio(enforcer: QosEnforcer) -> None:
    assert enforcer.layout.version == 1
    assert enforcer.layout.hierarchy_dir == BLKIO


@pytest.mark.parametrize("rw, limit", [("randread", 600), ("randwrite", 400)])
def test_limit_holds_for_a_direct_io_load(
    lab: Lab, enforcer: QosEnforcer, rw: str, limit: int
) -> None:
    dev, dev_id = lab.loop(fill=True)  # written blocks: no allocation on the write path
    uid, pod = lab.pod()
    ctr = lab.container(pod, "cri-containerd-app.scope")
    spec = QosSpec(max_read_iops=limit, max_write_iops=limit)
    enforcer.apply("vol-1", uid, dev_id, spec)
    enforcer.apply("vol-1", uid, dev_id, spec)  # NodePublish repeated: same result
    # Both the pod cgroup and the container carry a rule (v1 is not hierarchical).
    assert limits.read_v1(pod, dev_id).read_iops > 0
    assert limits.read_v1(ctr, dev_id).read_iops > 0

    # The first second lets the split notice that only the container does I/O.
    r = lab.start_fio(ctr, FioJob(dev, rw, runtime_s=2, ramp_s=1, iodepth=16)).wait()
    assert_near(r.read_iops if rw == "randread" else r.write_iops, limit)

    enforcer.remove("vol-1", uid)
    enforcer.remove("vol-1", uid)  # NodeUnpublish repeated: fine
    for cg in (pod, ctr):
        assert limits.read_v1(cg, dev_id).unlimited
        with open(os.path.join(cg, limits.V1_FILES["read_iops"]), encoding="ascii") as f:
            assert f.read() == ""  # "MAJ:MIN 0" removed the rule in the kernel


def test_tier_change_under_a_running_load(lab: Lab, enforcer: QosEnforcer) -> None:
    dev, dev_id = lab.loop(fill=True)
    uid, pod = lab.pod(qos="besteffort")
    ctr = lab.container(pod)
    enforcer.apply("vol-1", uid, dev_id, QosSpec(max_read_iops=900))
    load = lab.start_fio(ctr, FioJob(dev, "randread", runtime_s=5, iodepth=16))
    try:
        time.sleep(1.0)
        before, _ = window_iops(pod, dev_id, 1.0)
        assert enforcer.update("vol-1", QosSpec(max_read_iops=300)) is True
        time.sleep(0.3)
        after, _ = window_iops(pod, dev_id, 1.0)
        assert load.running(), "the load must run on, untouched, across the change"
    finally:
        lab.stop(load)
    assert_near(before, 900)
    assert_near(after, 300)


def test_container_created_after_apply_gets_rules(lab: Lab, enforcer: QosEnforcer) -> None:
    dev, dev_id = lab.loop(fill=True)
    uid, pod = lab.pod()
    pause = lab.container(pod, "pause")  # the sandbox exists at NodePublish ...
    enforcer.apply("vol-1", uid, dev_id, QosSpec(max_write_iops=500))
    app = lab.container(pod, "app")  # ... the app container comes after
    assert wait_for(lambda: limits.read_v1(app, dev_id).write_iops > 0), "no rule on the new one"
    assert limits.read_v1(pause, dev_id).write_iops < 500  # the budget was re-split

    r = lab.start_fio(app, FioJob(dev, "randwrite", runtime_s=2, ramp_s=1, iodepth=16)).wait()
    assert_near(r.write_iops, 500)
    # The idle pause container and the pod cgroup keep only a floor.
    assert limits.read_v1(pause, dev_id).write_iops < 10


def test_noisy_neighbour_is_squeezed_for_a_guaranteed_volume(
    lab: Lab, enforcer: QosEnforcer
) -> None:
    g_dev, g_id = lab.loop(128 * MIB, fill=True)
    n_dev, n_id = lab.loop(128 * MIB, fill=True)
    g_uid, g_pod = lab.pod(qos="")
    n_uid, n_pod = lab.pod(qos="besteffort")
    g_ctr, n_ctr = lab.container(g_pod), lab.container(n_pod)
    enforcer.apply("vol-noisy", n_uid, n_id, QosSpec("noisy"))  # no maximum at all
    # A minimum the guaranteed load cannot reach while the neighbour runs at full speed.
    enforcer.apply("vol-g", g_uid, g_id, QosSpec("g", min_read_iops=1_000_000))
    noisy = lab.start_fio(n_ctr, FioJob(n_dev, "randrw", runtime_s=20, iodepth=16))
    guaranteed = lab.start_fio(g_ctr, FioJob(g_dev, "randread", runtime_s=20, iodepth=4))
    squeeze = SqueezeLoop(enforcer, SqueezeConfig(interval_s=0.25, floor_iops=200))
    try:
        # The neighbour is squeezed down to the floor, in the kernel's rules too (the
        # container holds all but the idle pod cgroup's sliver of it).
        floor = IopsCap(200, 200)
        assert wait_for(lambda: enforcer.volumes()["vol-noisy"].cap == floor, timeout_s=10)
        assert wait_for(lambda: 190 <= limits.read_v1(n_ctr, n_id).write_iops <= 200)
        assert 190 <= limits.read_v1(n_ctr, n_id).read_iops <= 200
        noisy_read, noisy_write = window_iops(n_pod, n_id, 1.0)
        # The kernel holds it there (only the upper bound is the squeeze's business).
        assert noisy_read + noisy_write <= 400 * (1 + TOLERANCE)
        # The guaranteed load stops: the neighbour gets its tier back at once.
        lab.stop(guaranteed)
        assert wait_for(lambda: enforcer.volumes()["vol-noisy"].cap is None, timeout_s=5)
        assert limits.read_v1(n_ctr, n_id).unlimited
    finally:
        squeeze.close()
        lab.stop(noisy)
        lab.stop(guaranteed)


def test_volume_counters_follow_the_kernel(lab: Lab, enforcer: QosEnforcer) -> None:
    dev, dev_id = lab.loop()
    uid, pod = lab.pod()
    ctr = lab.container(pod)
    enforcer.apply("vol-1", uid, dev_id, QosSpec(max_read_iops=400))
    lab.start_fio(ctr, FioJob(dev, "randread", runtime_s=1, iodepth=1)).wait()
    c = enforcer.counters("vol-1")
    assert 200 <= c.read_ios <= 600 and c.write_ios == 0
    assert c.read_bytes == c.read_ios * 4096
