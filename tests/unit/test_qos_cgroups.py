"""Controller detection and kubelet pod-cgroup layouts, on fake cgroup trees (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import InvalidSpec, NotFound, Unavailable
from engine.qos.cgroups import (
    descendant_cgroups,
    detect,
    find_pod_cgroup,
    pod_cgroup_candidates,
)

UID = "5f1c2a7e-0b4d-4c3e-9a1b-2c3d4e5f6a7b"
V1_FILES = [
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
]

# (cgroup driver, QoS class) -> pod cgroup path relative to the hierarchy
LAYOUTS = {
    ("cgroupfs", "guaranteed"): f"kubepods/pod{UID}",
    ("cgroupfs", "burstable"): f"kubepods/burstable/pod{UID}",
    ("cgroupfs", "besteffort"): f"kubepods/besteffort/pod{UID}",
    ("systemd", "guaranteed"): f"kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice",
    ("systemd", "burstable"): "kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice",
    ("systemd", "besteffort"): "kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice",
}


def v1_root(tmp_path: Path, blkio_name: str = "blkio") -> Path:
    """Like this machine: v1 blkio, and a cgroup2 mount at unified/ without io."""
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (root / "memory").mkdir()
    (root / blkio_name).mkdir()
    for name in V1_FILES:
        (root / blkio_name / name).write_text("")
    return root


def v2_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    return root


def test_detects_v1_when_the_unified_mount_lacks_io(tmp_path: Path) -> None:
    root = v1_root(tmp_path)
    layout = detect(str(root))
    assert layout.version == 1
    assert layout.hierarchy_dir == str(root / "blkio")
    assert layout.pods_parent_dir.rstrip("/") == str(root / "blkio")


def test_detects_a_comounted_v1_blkio(tmp_path: Path) -> None:
    root = v1_root(tmp_path, blkio_name="blkio,cpu")
    assert detect(str(root)).hierarchy_dir == str(root / "blkio,cpu")


def test_prefers_v2_with_io(tmp_path: Path) -> None:
    root = v2_root(tmp_path)
    layout = detect(str(root), kubelet_parent="/nested/")
    assert layout.version == 2
    assert layout.hierarchy_dir == str(root)
    assert layout.pods_parent_dir == str(root / "nested")


def test_detects_hybrid_v2_with_io_on_unified(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("io memory\n")
    layout = detect(str(root))
    assert (layout.version, layout.hierarchy_dir) == (2, str(root / "unified"))


def test_v2_without_io_and_no_v1_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    with pytest.raises(Unavailable):
        detect(str(root))
    with pytest.raises(Unavailable):
        detect(str(tmp_path / "absent"))


def test_kubelet_parent_may_not_escape(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        detect(str(v1_root(tmp_path)), kubelet_parent="../etc")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("layout_key", sorted(LAYOUTS))
def test_finds_the_pod_cgroup_in_every_kubelet_layout(
    tmp_path: Path, version: int, layout_key: tuple[str, str]
) -> None:
    root = v1_root(tmp_path) if version == 1 else v2_root(tmp_path)
    layout = detect(str(root), kubelet_parent="test-parent")
    pod_dir = os.path.join(layout.pods_parent_dir, LAYOUTS[layout_key])
    os.makedirs(pod_dir)
    # Another pod in the same tree must not be picked up.
    os.makedirs(os.path.join(layout.pods_parent_dir, "kubepods", "podother"))
    assert find_pod_cgroup(layout, UID) == pod_dir


def test_missing_pod_is_not_found(tmp_path: Path) -> None:
    layout = detect(str(v1_root(tmp_path)))
    with pytest.raises(NotFound):
        find_pod_cgroup(layout, UID)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "pod uid", "-leading", "x" * 200])
def test_pod_uids_that_could_leave_the_tree_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSpec):
        pod_cgroup_candidates(bad)


def test_candidates_cover_both_drivers() -> None:
    paths = pod_cgroup_candidates(UID)
    assert sorted(paths) == sorted(LAYOUTS.values())


def test_descendants_lists_nested_cgroups_parents_first(tmp_path: Path) -> None:
    pod = tmp_path / "pod"
    (pod / "cri-containerd-aaa.scope" / "nested").mkdir(parents=True)
    (pod / "bbb").mkdir()
    (pod / "not-a-cgroup-file").write_text("")
    found = [os.path.relpath(p, pod) for p in descendant_cgroups(str(pod))]
    assert found == ["bbb", "cri-containerd-aaa.scope", "cri-containerd-aaa.scope/nested"]
    assert descendant_cgroups(str(tmp_path / "absent")) == []
