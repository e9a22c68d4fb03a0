"""QosEnforcer on fake cgroup trees: v1 and v2, both kubelet drivers, no root.

The fake files are plain files: each holds the last rule written (the enforcer opens them
with O_TRUNC), which is all these tests read back. Real kernel semantics are covered by
tests/integration/test_qos_blkio.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.errors import InvalidSpec, NotFound, Unavailable
from engine.qos import limits
from engine.qos.cgroups import detect
from engine.qos.limits import IoLimits, IopsCap
from engine.qos.stats import IoCounters
from engine.qos.throttle import QosBinding, QosEnforcer
from engine.qos.tiers import DEFAULT_TIERS, QosSpec

UID = "5f1c2a7e-0b4d-4c3e-9a1b-2c3d4e5f6a7b"
UID2 = "0a0b0c0d-1111-2222-3333-444455556666"
DEV = (7, 3)
SILVER = DEFAULT_TIERS["silver"]  # 5000/5000 IOPS, 200/200 MB/s
V1_STAT_FILES = [
    "blkio.throttle.io_serviced",
    "blkio.throttle.io_serviced_recursive",
    "blkio.throttle.io_service_bytes",
    "blkio.throttle.io_service_bytes_recursive",
]


def make_cgroup(path: Path, version: int) -> Path:
    """A directory with the files the kernel would show in it."""
    path.mkdir(parents=True, exist_ok=True)
    names = ["io.max", "io.stat"] if version == 2 else [*limits.V1_FILES.values(), *V1_STAT_FILES]
    for name in names:
        (path / name).touch()
    return path


def make_root(tmp_path: Path, version: int) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    if version == 2:
        (root / "cgroup.controllers").write_text("cpu io memory\n")
        make_cgroup(root, 2)
    else:
        (root / "unified").mkdir()
        (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
        make_cgroup(root / "blkio", 1)
    return root


def pod_path(root: Path, version: int, driver: str, uid: str = UID) -> Path:
    base = root if version == 2 else root / "blkio"
    if driver == "systemd":
        u = uid.replace("-", "_")
        return base / "kubepods.slice/kubepods-burstable.slice" / f"kubepods-burstable-pod{u}.slice"
    return base / "kubepods/burstable" / f"pod{uid}"


def container(driver: str, n: int) -> str:
    return f"cri-containerd-{n:064x}.scope" if driver == "systemd" else f"{n:064x}"


def v1_limits(cg: Path) -> IoLimits:
    return limits.read_v1(str(cg), DEV)


def write_serviced(cg: Path, reads: int, writes: int, own: bool = True) -> None:
    """Fake the kernel's counters of one cgroup: its own I/O (own=True) or only its
    descendants' (recursive file only)."""
    text = f"{DEV[0]}:{DEV[1]} Read {reads}\n{DEV[0]}:{DEV[1]} Write {writes}\n"
    names = ["blkio.throttle.io_serviced_recursive"]
    if own:
        names.append("blkio.throttle.io_serviced")
    for name in names:
        (cg / name).write_text(text)


@pytest.fixture
def enforcers():
    made: list[QosEnforcer] = []

    def make(root: Path, **kw: object) -> QosEnforcer:
        kw.setdefault("background", False)
        e = QosEnforcer(str(root), **kw)  # type: ignore[arg-type]
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


# --- cgroup v2 --------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_v2_apply_update_remove_on_the_pod_cgroup(tmp_path: Path, enforcers, driver: str) -> None:
    root = make_root(tmp_path, 2)
    pod = make_cgroup(pod_path(root, 2, driver), 2)
    make_cgroup(pod / container(driver, 1), 2)
    enf = enforcers(root)
    assert enf.layout.version == 2

    enf.apply("vol-1", UID, DEV, SILVER)
    expected = "7:3 riops=5000 wiops=5000 rbps=200000000 wbps=200000000\n"
    assert (pod / "io.max").read_text() == expected
    assert (pod / container(driver, 1) / "io.max").read_text() == ""  # hierarchical: not needed

    enf.apply("vol-1", UID, DEV, SILVER)  # idempotent
    assert (pod / "io.max").read_text() == expected
    assert enf.bindings() == [QosBinding("vol-1", UID, DEV, SILVER)]

    assert enf.update("vol-1", DEFAULT_TIERS["bronze"]) is True
    assert (pod / "io.max").read_text() == "7:3 riops=1000 wiops=1000 rbps=50000000 wbps=50000000\n"
    assert enf.update("vol-unknown", SILVER) is False

    enf.remove("vol-1", UID)
    assert (pod / "io.max").read_text() == "7:3 riops=max wiops=max rbps=max wbps=max\n"
    assert enf.bindings() == []
    enf.remove("vol-1", UID)  # idempotent


def test_v2_unlimited_spec_clears_the_line(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod = make_cgroup(pod_path(root, 2, "cgroupfs"), 2)
    enf = enforcers(root)
    enf.apply("vol-1", UID, DEV, QosSpec())
    assert (pod / "io.max").read_text() == "7:3 riops=max wiops=max rbps=max wbps=max\n"


def test_v2_missing_pod_is_not_found_and_leaves_no_binding(tmp_path: Path, enforcers) -> None:
    enf = enforcers(make_root(tmp_path, 2))
    with pytest.raises(NotFound):
        enf.apply("vol-1", UID, DEV, SILVER)
    assert enf.bindings() == [] and enf.volumes() == {}


def test_v2_without_io_max_in_the_pod_is_unavailable(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod_path(root, 2, "cgroupfs").mkdir(parents=True)  # no io.max: controller not delegated
    enf = enforcers(root)
    with pytest.raises(Unavailable):
        enf.apply("vol-1", UID, DEV, SILVER)


def test_invalid_inputs_write_nothing(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod = make_cgroup(pod_path(root, 2, "cgroupfs"), 2)
    enf = enforcers(root)
    with pytest.raises(InvalidSpec):
        enf.apply("vol-1", UID, DEV, QosSpec(min_read_iops=10, max_read_iops=5))
    with pytest.raises(InvalidSpec):
        enf.apply("vol-1", "../escape", DEV, SILVER)
    with pytest.raises(InvalidSpec):
        enf.apply("vol-1", UID, (7, -1), SILVER)
    assert (pod / "io.max").read_text() == ""
    assert enf.bindings() == []


def test_v2_volume_shared_by_two_pods_splits_its_budget(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod1 = make_cgroup(pod_path(root, 2, "cgroupfs", UID), 2)
    pod2 = make_cgroup(pod_path(root, 2, "systemd", UID2), 2)
    enf = enforcers(root)
    spec = QosSpec(max_read_iops=1000, max_write_iops=2000)
    enf.apply("vol-1", UID, DEV, spec)
    enf.apply("vol-1", UID2, DEV, spec)
    assert limits.read_v2(str(pod1))[DEV] == IoLimits(500, 1000)
    assert limits.read_v2(str(pod2))[DEV] == IoLimits(500, 1000)

    # Only pod 2 does I/O: after two periods it gets nearly all of the budget, in both
    # directions (a pod turning from reads to writes keeps its share).
    enf.tick(rebalance=True)
    (pod2 / "io.stat").write_text("7:3 rbytes=4096 wbytes=0 rios=100 wios=0\n")
    enf.tick(rebalance=True)
    assert limits.read_v2(str(pod1))[DEV] == IoLimits(5, 10)
    assert limits.read_v2(str(pod2))[DEV] == IoLimits(995, 1990)
    assert enf.counters("vol-1") == IoCounters(100, 0, 4096, 0)

    enf.remove("vol-1", UID2)  # the remaining pod gets the whole budget back
    assert limits.read_v2(str(pod1))[DEV] == IoLimits(1000, 2000)


def test_restore_reapplies_and_reports_gone_pods(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod = make_cgroup(pod_path(root, 2, "systemd"), 2)
    enf = enforcers(root)
    failed = enf.restore(
        [QosBinding("vol-1", UID, DEV, SILVER), QosBinding("vol-2", UID2, (7, 4), SILVER)]
    )
    assert [b.volume_id for b, _ in failed] == ["vol-2"]
    assert limits.read_v2(str(pod))[DEV] == IoLimits.from_spec(SILVER)
    assert [b.volume_id for b in enf.bindings()] == ["vol-1"]


def test_cap_lowers_and_restores_the_limits(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 2)
    pod = make_cgroup(pod_path(root, 2, "cgroupfs"), 2)
    enf = enforcers(root)
    enf.apply("vol-1", UID, DEV, SILVER)
    enf.set_cap("vol-1", IopsCap(300, 0))
    assert limits.read_v2(str(pod))[DEV] == IoLimits(300, 5000, 200_000_000, 200_000_000)
    assert enf.volumes()["vol-1"].cap == IopsCap(300, 0)
    enf.update("vol-1", DEFAULT_TIERS["bronze"])  # a tier change keeps the squeeze on
    assert limits.read_v2(str(pod))[DEV].read_iops == 300
    enf.set_cap("vol-1", None)
    assert limits.read_v2(str(pod))[DEV] == IoLimits.from_spec(DEFAULT_TIERS["bronze"])
    enf.set_cap("vol-unknown", IopsCap(1, 1))  # ignored


def test_new_device_for_a_known_volume_moves_the_rules(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, "cgroupfs"), 1)
    enf = enforcers(root)
    enf.apply("vol-1", UID, (7, 3), SILVER)
    enf.apply("vol-1", UID, (7, 9), SILVER)  # e.g. re-attached after a node restart
    assert (pod / "blkio.throttle.read_iops_device").read_text() == "7:9 5000\n"
    assert enf.volumes()["vol-1"].device == (7, 9)


# --- cgroup v1 --------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_v1_rules_on_the_pod_and_every_container(tmp_path: Path, enforcers, driver: str) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, driver), 1)
    c1 = make_cgroup(pod / container(driver, 1), 1)
    c2 = make_cgroup(pod / container(driver, 2), 1)
    enf = enforcers(root)
    assert enf.layout.version == 1
    spec = QosSpec(max_read_iops=900, max_write_iops=300, max_read_mbps=3)
    enf.apply("vol-1", UID, DEV, spec)
    # Nothing observed yet: three equal shares (pod itself + two containers).
    for cg in (pod, c1, c2):
        assert v1_limits(cg) == IoLimits(300, 100, 1_000_000, 0)

    # Only c2 does I/O: after two periods it holds almost all of the budget.
    enf.tick(rebalance=True)
    write_serviced(c2, reads=50, writes=5)
    write_serviced(pod, reads=50, writes=5, own=False)  # the pod's recursive count has c2's
    enf.tick(rebalance=True)
    assert v1_limits(c2) == IoLimits(892, 298, 2_970_000, 0)
    assert v1_limits(c1) == IoLimits(4, 1, 15_000, 0)
    assert v1_limits(pod) == IoLimits(4, 1, 15_000, 0)
    # A quiet period changes nothing: c2 keeps its share for when it resumes.
    enf.tick(rebalance=True)
    assert v1_limits(c2) == IoLimits(892, 298, 2_970_000, 0)

    enf.remove("vol-1", UID)
    for cg in (pod, c1, c2):
        assert v1_limits(cg).unlimited


def test_v1_container_created_later_gets_a_share(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, "systemd"), 1)
    enf = enforcers(root)
    enf.apply("vol-1", UID, DEV, QosSpec(max_write_iops=1000))
    assert v1_limits(pod).write_iops == 1000

    c1 = make_cgroup(pod / container("systemd", 1), 1)  # the kubelet starts the app
    enf.tick(rebalance=False)  # the inotify event alone triggers the re-split
    assert v1_limits(c1).write_iops == 500
    assert v1_limits(pod).write_iops == 500

    nested = make_cgroup(c1 / "nested", 1)  # a container that makes its own cgroups
    enf.tick(rebalance=False)
    assert v1_limits(nested).write_iops == 333

    for f in nested.iterdir():  # the kernel removes the files with the directory
        f.unlink()
    nested.rmdir()
    enf.tick(rebalance=False)
    assert v1_limits(c1).write_iops == 500


def test_v1_watcher_thread_catches_new_containers(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, "cgroupfs"), 1)
    enf = enforcers(root, background=True, rebalance_interval_s=60.0)
    enf.apply("vol-1", UID, DEV, QosSpec(max_read_iops=800))
    # The fake kernel needs a moment to create the files after the mkdir; the real one
    # creates them with the directory.
    c1 = pod / container("cgroupfs", 1)
    tmp = tmp_path / "staging"
    make_cgroup(tmp, 1)
    os.rename(tmp, c1)  # appears complete, as a kernel mkdir does
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and v1_limits(c1).read_iops != 400:
        time.sleep(0.02)
    assert v1_limits(c1).read_iops == 400


def test_v1_remove_without_memory_clears_with_the_device(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, "cgroupfs"), 1)
    c1 = make_cgroup(pod / container("cgroupfs", 1), 1)
    first = enforcers(root)
    first.apply("vol-1", UID, DEV, SILVER)
    second = enforcers(root)  # a restarted driver that did not restore
    second.remove("vol-1", UID, device=DEV)
    assert v1_limits(pod).unlimited and v1_limits(c1).unlimited
    second.remove("vol-1", UID2, device=DEV)  # pod gone: fine


def test_v1_two_volumes_on_one_pod_are_independent(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    pod = make_cgroup(pod_path(root, 1, "cgroupfs"), 1)
    enf = enforcers(root)
    enf.apply("vol-1", UID, (7, 3), QosSpec(max_read_iops=100))
    enf.apply("vol-2", UID, (7, 4), QosSpec(max_read_iops=200))
    enf.remove("vol-1", UID)
    # The watch stays while vol-2 uses the pod: a new container still gets vol-2's rule.
    c1 = make_cgroup(pod / container("cgroupfs", 1), 1)
    enf.tick(rebalance=False)
    assert limits.read_v1(str(c1), (7, 4)).read_iops == 100


def test_detect_failure_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        QosEnforcer(str(tmp_path), background=False)


def test_counters_of_an_unknown_volume(tmp_path: Path, enforcers) -> None:
    root = make_root(tmp_path, 1)
    enf = enforcers(root, layout=detect(str(root)))
    with pytest.raises(NotFound):
        enf.counters("vol-x")
