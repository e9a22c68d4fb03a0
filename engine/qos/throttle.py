"""QosEnforcer: keeps each published volume's tier limits on the cgroups of the pods using it.

The CSI node service calls apply() at NodePublish, remove() at NodeUnpublish, update() when
the tier changes online, and restore() once after a restart. The squeeze loop lowers a
bursting volume's limits for a while through set_cap().

cgroup v2: one io.max line on the pod cgroup covers all its containers (hierarchical).
cgroup v1: blkio.throttle is per cgroup and not hierarchical, so every cgroup of the pod
(the pod's own and each container's, nested ones too) gets a rule, the pod's budget is
split between them, and a watcher thread (inotify) puts rules on containers created later.
Every period the split follows which members actually did I/O (see split.py).

Rules stay in the kernel when the driver stops: pods keep their limits across a restart,
and restore() takes them over again.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Self

from engine.errors import EngineError, NotFound, Unavailable
from engine.qos import limits as rules
from engine.qos import stats
from engine.qos.cgroups import (
    DEFAULT_CGROUP_ROOT,
    CgroupLayout,
    check_pod_uid,
    descendant_cgroups,
    detect,
    find_pod_cgroup,
)
from engine.qos.inotify import DIR_EVENTS, IN_IGNORED, IN_Q_OVERFLOW, Inotify
from engine.qos.limits import (
    CgroupGone,
    Device,
    IoLimits,
    IopsCap,
    check_device,
    effective_limits,
)
from engine.qos.split import IDLE_FLOOR_FRACTION, split_budget
from engine.qos.stats import IoCounters
from engine.qos.tiers import QosSpec

log = logging.getLogger(__name__)

DEFAULT_REBALANCE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class QosBinding:
    """One volume published to one pod: what the node records and hands to restore()."""

    volume_id: str
    pod_uid: str
    device: Device  # (major, minor) of the volume's block device on this node
    spec: QosSpec


@dataclass(frozen=True)
class VolumeView:
    """Read-only picture of one enforced volume (for the squeeze loop, metrics and the CLI)."""

    volume_id: str
    device: Device
    spec: QosSpec
    cap: IopsCap | None
    pod_uids: tuple[str, ...]
    effective: IoLimits


@dataclass
class _Share:
    """One cgroup that holds a share of a budget, and what we know of its recent I/O."""

    last: IoCounters | None = None
    # Did I/O (either direction) last period; None: not observed yet. Directions are not
    # told apart, so a container that turns from reads to writes keeps its share.
    active: bool | None = None
    written: IoLimits | None = None  # last rule written, to skip rewriting the same

    def moved(self, now: IoCounters) -> bool | None:
        """Did I/O since the last look (None: first look)? Remembers `now` either way."""
        last, self.last = self.last, now
        if last is None:
            return None
        return (now.read_ios, now.write_ios) != (last.read_ios, last.write_ios)


def _observe_group(shares: list[_Share], counters: list[IoCounters]) -> None:
    """Update who is active. A period in which nobody did I/O changes nothing: the app that
    paused keeps its share for when it resumes, the pause container keeps its floor."""
    moved = [s.moved(c) for s, c in zip(shares, counters, strict=True)]
    if not any(moved):
        return
    for share, m in zip(shares, moved, strict=True):
        share.active = m


@dataclass
class _Pod:
    uid: str
    cgroup_dir: str
    share: _Share = field(default_factory=_Share)  # the pod's part of the volume's budget
    members: dict[str, _Share] = field(default_factory=dict)  # v1: cgroup dir -> its share


@dataclass
class _Volume:
    device: Device
    spec: QosSpec
    cap: IopsCap | None = None
    pods: dict[str, _Pod] = field(default_factory=dict)


def _split(limits: IoLimits, shares: list[_Share], floor_fraction: float) -> list[IoLimits]:
    """Cut `limits` into one IoLimits per share, following who did I/O last period."""
    activity = [s.active for s in shares]
    columns = (
        split_budget(limits.read_iops, activity, floor_fraction),
        split_budget(limits.write_iops, activity, floor_fraction),
        split_budget(limits.read_bps, activity, floor_fraction),
        split_budget(limits.write_bps, activity, floor_fraction),
    )
    return [IoLimits(*values) for values in zip(*columns, strict=True)]


class QosEnforcer:
    def __init__(
        self,
        cgroup_root: str = DEFAULT_CGROUP_ROOT,
        *,
        kubelet_parent: str = "",
        layout: CgroupLayout | None = None,
        rebalance_interval_s: float = DEFAULT_REBALANCE_INTERVAL_S,
        idle_floor_fraction: float = IDLE_FLOOR_FRACTION,
        background: bool = True,
    ):
        """Detects the controller (Unavailable if none). With background=False no thread
        runs and the caller drives tick() itself (unit tests)."""
        self.layout = layout or detect(cgroup_root, kubelet_parent)
        self.rebalance_interval_s = rebalance_interval_s
        self.idle_floor_fraction = idle_floor_fraction
        self._lock = threading.RLock()
        self._volumes: dict[str, _Volume] = {}
        self._inotify = Inotify() if self.layout.version == 1 else None
        self._watches: dict[str, int] = {}  # watched cgroup dir -> watch descriptor
        self._dirty_pod_dirs: set[str] = set()
        self._next_rebalance = time.monotonic() + rebalance_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        if background:
            self._thread = threading.Thread(target=self._run, name="qos-enforcer", daemon=True)
            self._thread.start()

    # --- the API the CSI node calls ---------------------------------------------------------

    def apply(self, volume_id: str, pod_uid: str, device: Device, spec: QosSpec) -> None:
        """Limit `device` for the pod (NodePublish). Idempotent; a new spec or device for a
        known volume replaces the old one on every pod. NotFound if the pod has no cgroup."""
        check_pod_uid(pod_uid)
        device = check_device(device)
        spec.validate()
        with self._lock:
            pod_dir = find_pod_cgroup(self.layout, pod_uid)
            if self.layout.version == 2 and not os.path.exists(
                os.path.join(pod_dir, rules.V2_IO_MAX)
            ):
                raise Unavailable(f"{pod_dir} has no io.max: io controller not enabled there")
            vol = self._volumes.get(volume_id)
            new_volume = vol is None
            if vol is None:
                vol = self._volumes[volume_id] = _Volume(device, spec)
            elif vol.device != device:
                log.info("volume %s moved from %s to %s", volume_id, vol.device, device)
                for other in vol.pods.values():
                    self._clear_pod(other, vol.device)
                vol.device = device
            vol.spec = spec
            known = vol.pods.get(pod_uid)
            new_pod = known is None or known.cgroup_dir != pod_dir
            pod = _Pod(pod_uid, pod_dir) if known is None or new_pod else known
            vol.pods[pod_uid] = pod
            try:
                self._scan_pod(pod, vol.device)
                self._enforce(vol, force=True, strict_pod=pod_uid)
            except BaseException:
                if new_pod:
                    vol.pods.pop(pod_uid, None)
                    self._unwatch_unused()
                if new_volume:
                    self._volumes.pop(volume_id, None)
                raise
        log.info("qos: %s on pod %s, device %d:%d, %s", volume_id, pod_uid, *device, spec)

    def update(self, volume_id: str, spec: QosSpec) -> bool:
        """New limits for every pod using the volume, at once, no remount. False if the
        volume is not published on this node (nothing to do)."""
        spec.validate()
        with self._lock:
            vol = self._volumes.get(volume_id)
            if vol is None:
                return False
            vol.spec = spec
            self._enforce(vol, force=True)
        log.info("qos: %s now %s", volume_id, spec)
        return True

    def remove(self, volume_id: str, pod_uid: str, device: Device | None = None) -> None:
        """Lift the volume's rules from the pod (NodeUnpublish). Idempotent. If this process
        does not know the binding (never restored), `device` lets it clear the rules anyway."""
        check_pod_uid(pod_uid)
        with self._lock:
            vol = self._volumes.get(volume_id)
            pod = vol.pods.pop(pod_uid, None) if vol is not None else None
            if vol is not None and pod is not None:
                self._scan_pod(pod, vol.device, watch=False)  # containers born since the last look
                self._clear_pod(pod, vol.device)
            elif device is not None:
                try:
                    stray = _Pod(pod_uid, find_pod_cgroup(self.layout, pod_uid))
                except NotFound:
                    stray = None
                if stray is not None:
                    dev = check_device(device)
                    self._scan_pod(stray, dev, watch=False)
                    self._clear_pod(stray, dev)
            if vol is not None:
                if vol.pods:
                    self._enforce(vol, force=False)  # the others get the freed budget
                else:
                    del self._volumes[volume_id]
            self._unwatch_unused()
        log.info("qos: %s off pod %s", volume_id, pod_uid)

    def restore(self, entries: Iterable[QosBinding]) -> list[tuple[QosBinding, str]]:
        """Re-apply recorded bindings after a restart; returns those that could not be
        (typically pods that are gone), with the reason, instead of failing on the first."""
        failed: list[tuple[QosBinding, str]] = []
        for b in entries:
            try:
                self.apply(b.volume_id, b.pod_uid, b.device, b.spec)
            except EngineError as e:
                log.warning("qos: cannot restore %s on pod %s: %s", b.volume_id, b.pod_uid, e)
                failed.append((b, str(e)))
        return failed

    def close(self) -> None:
        """Stop the watcher; the rules stay in the kernel (see the module docstring)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- for the squeeze loop, metrics and the CLI -------------------------------------------

    def set_cap(self, volume_id: str, cap: IopsCap | None) -> None:
        """Lower (or, with None, restore) a volume's IOPS limits below its tier for a while."""
        with self._lock:
            vol = self._volumes.get(volume_id)
            if vol is None or vol.cap == cap:
                return
            vol.cap = cap if cap is not None and (cap.read_iops or cap.write_iops) else None
            self._enforce(vol, force=False)

    def volumes(self) -> dict[str, VolumeView]:
        with self._lock:
            return {
                vid: VolumeView(
                    vid,
                    v.device,
                    v.spec,
                    v.cap,
                    tuple(sorted(v.pods)),
                    effective_limits(v.spec, v.cap),
                )
                for vid, v in self._volumes.items()
            }

    def bindings(self) -> list[QosBinding]:
        with self._lock:
            return [
                QosBinding(vid, uid, v.device, v.spec)
                for vid, v in sorted(self._volumes.items())
                for uid in sorted(v.pods)
            ]

    def counters(self, volume_id: str) -> IoCounters:
        """The volume's completed I/O, summed over the pods using it on this node."""
        with self._lock:
            vol = self._volumes.get(volume_id)
            if vol is None:
                raise NotFound(f"volume {volume_id} is not published on this node")
            total = IoCounters()
            for pod in vol.pods.values():
                total = total + stats.read_cgroup(self.layout.version, pod.cgroup_dir, vol.device)
            return total

    # --- the watcher ---------------------------------------------------------------------------

    def tick(self, rebalance: bool | None = None) -> None:
        """Handle pending cgroup events; rebalance the splits when due (or when asked)."""
        with self._lock:
            if self._inotify is not None:
                for ev in self._inotify.read_events():
                    if ev.mask & IN_Q_OVERFLOW:
                        self._dirty_pod_dirs.update(
                            p.cgroup_dir for v in self._volumes.values() for p in v.pods.values()
                        )
                        continue
                    watched = next((d for d, wd in self._watches.items() if wd == ev.wd), None)
                    if watched is None:
                        continue
                    if ev.mask & IN_IGNORED:
                        del self._watches[watched]  # the directory is gone
                    self._dirty_pod_dirs.add(watched)
            now = time.monotonic()
            if rebalance is None:
                rebalance = now >= self._next_rebalance
            if rebalance:
                self._next_rebalance = now + self.rebalance_interval_s
            dirty = self._dirty_pod_dirs
            self._dirty_pod_dirs = set()
            for vid, vol in list(self._volumes.items()):
                touched = False
                for pod in vol.pods.values():
                    if rebalance or any(_within(d, pod.cgroup_dir) for d in dirty):
                        self._scan_pod(pod, vol.device)
                        touched = True
                if rebalance:
                    self._observe(vol)
                if touched or rebalance:
                    try:
                        self._enforce(vol, force=False)
                    except EngineError as e:  # e.g. the device was detached under us
                        log.warning("qos: cannot refresh rules of %s: %s", vid, e)

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = max(0.0, self._next_rebalance - time.monotonic())
            fds = [self._wake_r]
            if self._inotify is not None:
                fds.append(self._inotify.fileno())
            try:
                select.select(fds, [], [], timeout)
            except (OSError, ValueError):
                return  # closed under us
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # keep watching; one bad pod must not end enforcement
                log.exception("qos: watcher tick failed")

    # --- internals -----------------------------------------------------------------------------

    def _scan_pod(self, pod: _Pod, device: Device, watch: bool = True) -> None:
        """v1: refresh the pod's member cgroups (itself and every descendant) and watch them."""
        if self.layout.version != 1:
            return
        dirs = [pod.cgroup_dir, *descendant_cgroups(pod.cgroup_dir)]
        if watch and self._inotify is not None:
            for d in dirs:
                if d not in self._watches:
                    try:
                        self._watches[d] = self._inotify.add_watch(d, DIR_EVENTS)
                    except FileNotFoundError:
                        continue  # removed while we looked
        fresh = {d: pod.members.get(d) or _Share() for d in dirs if os.path.isdir(d)}
        for d, share in fresh.items():
            if share.last is None:
                share.last = stats.read_v1(d, device, recursive=False)
        pod.members = fresh

    def _observe(self, vol: _Volume) -> None:
        """Note which pods and members did I/O on the volume since the last period."""
        pods = list(vol.pods.values())
        _observe_group(
            [p.share for p in pods],
            [stats.read_cgroup(self.layout.version, p.cgroup_dir, vol.device) for p in pods],
        )
        if self.layout.version == 1:
            for pod in pods:
                dirs = list(pod.members)
                _observe_group(
                    [pod.members[d] for d in dirs],
                    [stats.read_v1(d, vol.device, recursive=False) for d in dirs],
                )

    def _enforce(self, vol: _Volume, force: bool, strict_pod: str | None = None) -> None:
        """Write every rule of the volume that differs from what it should be (all if force).
        A vanished cgroup is skipped (the kubelet is tearing it down), except the pod cgroup
        of `strict_pod`, whose caller must hear of it."""
        pods = list(vol.pods.values())
        budget = effective_limits(vol.spec, vol.cap)
        pod_limits = _split(budget, [p.share for p in pods], self.idle_floor_fraction)
        for pod, limits in zip(pods, pod_limits, strict=True):
            if self.layout.version == 2:
                if force or pod.share.written != limits:
                    try:
                        rules.write_v2(pod.cgroup_dir, vol.device, limits)
                    except CgroupGone:
                        if pod.uid == strict_pod:
                            raise
                        continue
                    pod.share.written = limits
                continue
            dirs = list(pod.members)
            if pod.uid == strict_pod and pod.cgroup_dir not in pod.members:
                raise NotFound(f"pod cgroup {pod.cgroup_dir} vanished")
            shares = _split(limits, [pod.members[d] for d in dirs], self.idle_floor_fraction)
            for d, share_limits in zip(dirs, shares, strict=True):
                member = pod.members[d]
                if not force and member.written == share_limits:
                    continue
                try:
                    previous = None if force else member.written
                    rules.write_v1(d, vol.device, share_limits, previous)
                except CgroupGone:
                    if d == pod.cgroup_dir and pod.uid == strict_pod:
                        raise
                    pod.members.pop(d, None)  # container ended between scan and write
                    continue
                member.written = share_limits

    def _clear_pod(self, pod: _Pod, device: Device) -> None:
        """Remove the device's rules from the pod's cgroups; gone cgroups hold none."""
        dirs = [pod.cgroup_dir, *pod.members] if self.layout.version == 1 else [pod.cgroup_dir]
        for d in dict.fromkeys(dirs):
            try:
                if self.layout.version == 2:
                    rules.write_v2(d, device, IoLimits())
                else:
                    rules.write_v1(d, device, IoLimits())
            except NotFound:
                pass  # cgroup or device gone: so are its rules

    def _unwatch_unused(self) -> None:
        if self._inotify is None:
            return
        in_use = [p.cgroup_dir for v in self._volumes.values() for p in v.pods.values()]
        for d in list(self._watches):
            if not any(_within(d, pod_dir) for pod_dir in in_use):
                self._inotify.rm_watch(self._watches.pop(d))


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
