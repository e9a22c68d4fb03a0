"""Which cgroup I/O controller this node offers, and where a pod's cgroups are.

The node plugin sees the host's tree through a host mount, so the root is injected
(default /sys/fs/cgroup); unit tests point it at a temporary tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from engine.errors import InvalidSpec, NotFound, Unavailable

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
V1_PROBE_FILE = "blkio.throttle.read_iops_device"

# Kubernetes pod UIDs are UUIDs; static pods use a bare hex hash. Nothing else may reach
# a path (no "/", no "..").
_POD_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,127}$")
_QOS_CLASSES = ("", "burstable", "besteffort")  # "" = guaranteed pods, directly under kubepods


@dataclass(frozen=True)
class CgroupLayout:
    """The usable I/O controller: `version` 2 (io.max) or 1 (blkio.throttle)."""

    version: int
    hierarchy_dir: str  # the mount that carries the controller
    pods_parent_dir: str  # where the kubelet's kubepods[.slice] lives inside it


def _controllers(directory: str) -> set[str]:
    try:
        with open(os.path.join(directory, "cgroup.controllers"), encoding="ascii") as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


def _v1_blkio_dir(root: str) -> str | None:
    """The v1 hierarchy that carries blkio: `blkio`, or a co-mount such as `blkio,cpu`."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return None
    for name in names:
        path = os.path.join(root, name)
        if "blkio" in name.split(",") and os.path.isfile(os.path.join(path, V1_PROBE_FILE)):
            return path
    return None


def detect(cgroup_root: str = DEFAULT_CGROUP_ROOT, kubelet_parent: str = "") -> CgroupLayout:
    """Prefer cgroup v2 with `io` enabled, else v1 blkio; Unavailable if neither is usable.

    `kubelet_parent` is the kubelet's --cgroup-root relative to the hierarchy ("" for the
    default; tests use it to build their tree in a private sub-cgroup).
    """
    parent = kubelet_parent.strip("/")
    if ".." in parent.split("/"):
        raise InvalidSpec(f"kubelet cgroup parent {kubelet_parent!r} leaves the hierarchy")
    # Pure v2 at the root, or hybrid with v2 at root/unified: both need `io` offered there.
    for v2_dir in (cgroup_root, os.path.join(cgroup_root, "unified")):
        if "io" in _controllers(v2_dir):
            return CgroupLayout(2, v2_dir, os.path.join(v2_dir, parent))
    v1_dir = _v1_blkio_dir(cgroup_root)
    if v1_dir is not None:
        return CgroupLayout(1, v1_dir, os.path.join(v1_dir, parent))
    raise Unavailable(
        f"no cgroup I/O controller under {cgroup_root}: neither cgroup v2 with `io` "
        "nor a cgroup v1 blkio hierarchy with throttle files"
    )


def check_pod_uid(pod_uid: str) -> str:
    if not isinstance(pod_uid, str) or not _POD_UID.match(pod_uid):
        raise InvalidSpec(f"pod UID {pod_uid!r} is not a Kubernetes UID")
    return pod_uid


def pod_cgroup_candidates(pod_uid: str) -> list[str]:
    """Relative paths the kubelet may have used, for both cgroup drivers and all QoS classes."""
    uid = check_pod_uid(pod_uid)
    underscored = uid.replace("-", "_")  # systemd slice names use "-" as the nesting separator
    paths = []
    for qos in _QOS_CLASSES:
        # cgroupfs driver
        paths.append(os.path.join("kubepods", qos, f"pod{uid}") if qos else f"kubepods/pod{uid}")
        # systemd driver
        if qos:
            paths.append(
                f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice"
            )
        else:
            paths.append(f"kubepods.slice/kubepods-pod{underscored}.slice")
    return paths


def find_pod_cgroup(layout: CgroupLayout, pod_uid: str) -> str:
    """The pod's cgroup directory; NotFound if the kubelet has not made it (or removed it)."""
    for rel in pod_cgroup_candidates(pod_uid):
        path = os.path.join(layout.pods_parent_dir, rel)
        if os.path.isdir(path):
            return path
    raise NotFound(f"no cgroup for pod {pod_uid} under {layout.pods_parent_dir}")


def descendant_cgroups(cgroup_dir: str) -> list[str]:
    """Every cgroup below cgroup_dir (containers, and anything they nest), parents first."""
    found: list[str] = []
    try:
        entries = sorted(os.scandir(cgroup_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            found.append(entry.path)
            found.extend(descendant_cgroups(entry.path))
    return found
