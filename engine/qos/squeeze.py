"""The squeeze loop: keep guaranteed minima when bursting neighbours eat the pool.

Admission only promises that the minima fit in the pool's capacity; neighbours without a
(high) maximum can still take it all. Every period the loop samples each volume's IOPS and
acts on the whole node at once (an AIMD law, as TCP does for the same problem):

- A direction (read or write) of a guaranteed volume is *starved* when it runs below
  `starved_below` x its minimum while it *wants more*: its device averages at least
  `busy_inflight` requests in flight (an idle or self-paced volume has a near-empty queue).
- If any is starved, every *burster* (a volume running above `healthy_above` x its own
  minimum and the floor) is capped at `decrease_factor` x what it just did, never below its
  own minimum nor the floor. Repeated each period until no one is starved.
- If no guaranteed volume does any I/O, every cap is lifted at once.
- If every active guaranteed direction is healthy (at or above `healthy_above` x its
  minimum) or content (below its minimum without wanting more), caps grow by
  `increase_factor` per period, and go when they reach the tier's maximum or stop binding
  (the volume runs below half its cap). Otherwise caps hold: the band between the two
  thresholds keeps the loop from oscillating.

The controller is pure (samples in, caps out) and unit-tested with synthetic samples; the
loop around it reads the kernel's counters and writes caps through QosEnforcer.set_cap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Self

from engine.errors import NotFound
from engine.qos import stats
from engine.qos.limits import IopsCap
from engine.qos.throttle import QosEnforcer
from engine.qos.tiers import QosSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeSample:
    """One volume over the last period."""

    read_iops: float
    write_iops: float
    read_inflight: float | None = None  # average requests in flight; None when unknown
    write_inflight: float | None = None


@dataclass(frozen=True)
class SqueezeConfig:
    interval_s: float = 1.0
    starved_below: float = 1.0
    healthy_above: float = 1.15
    busy_inflight: float = 0.25
    active_iops: float = 1.0  # below this a direction counts as idle
    decrease_factor: float = 0.7
    increase_factor: float = 1.25  # gentle: doubling re-starved the guaranteed volume here
    floor_iops: int = 50  # a squeezed volume never drops below this (nor its own minimum)


_DIRECTIONS = ("read", "write")


def _min_iops(spec: QosSpec, d: str) -> int:
    return int(getattr(spec, f"min_{d}_iops"))


def _max_iops(spec: QosSpec, d: str) -> int:
    return int(getattr(spec, f"max_{d}_iops"))


def _rate(s: VolumeSample, d: str) -> float:
    return float(getattr(s, f"{d}_iops"))


def _cap_of(cap: IopsCap | None, d: str) -> int:
    return int(getattr(cap, f"{d}_iops")) if cap is not None else 0


@dataclass
class SqueezeController:
    config: SqueezeConfig = field(default_factory=SqueezeConfig)
    caps: dict[str, IopsCap] = field(default_factory=dict)

    def _wants_more(self, s: VolumeSample, d: str) -> bool:
        inflight = getattr(s, f"{d}_inflight")
        if inflight is None:  # no queue statistics: assume an active volume wants more
            return _rate(s, d) >= self.config.active_iops
        return float(inflight) >= self.config.busy_inflight

    def step(
        self, samples: Mapping[str, VolumeSample], specs: Mapping[str, QosSpec]
    ) -> dict[str, IopsCap | None]:
        """New caps for the volumes whose cap changes (None = lift it)."""
        cfg = self.config
        changes: dict[str, IopsCap | None] = {}
        for vid in [v for v in self.caps if v not in samples or v not in specs]:
            del self.caps[vid]  # unpublished: nothing left to cap

        starved: set[str] = set()
        any_active = False  # some guaranteed direction is doing (or asking for) I/O
        all_fine = True  # ... and each of them is healthy or content
        for vid, s in samples.items():
            spec = specs.get(vid)
            if spec is None:
                continue
            for d in _DIRECTIONS:
                minimum = _min_iops(spec, d)
                rate = _rate(s, d)
                wants_more = self._wants_more(s, d)
                if not minimum or (rate < cfg.active_iops and not wants_more):
                    continue
                any_active = True
                if rate >= minimum * cfg.healthy_above or not wants_more:
                    continue
                all_fine = False
                if rate < minimum * cfg.starved_below:
                    starved.add(vid)

        if starved:
            for vid, s in samples.items():
                spec = specs.get(vid)
                if spec is None or vid in starved or not self._bursting(spec, s):
                    continue
                old = self.caps.get(vid)
                values = []
                for d in _DIRECTIONS:
                    want = max(
                        cfg.floor_iops, _min_iops(spec, d), int(_rate(s, d) * cfg.decrease_factor)
                    )
                    current = _cap_of(old, d)
                    values.append(min(want, current) if current else want)
                cap = IopsCap(*values)
                if cap != old:
                    self.caps[vid] = changes[vid] = cap
        elif not any_active:
            for vid in list(self.caps):
                del self.caps[vid]
                changes[vid] = None
        elif all_fine:
            for vid, old in list(self.caps.items()):
                spec, s = specs[vid], samples[vid]
                values = []
                for d in _DIRECTIONS:
                    current = _cap_of(old, d)
                    grown = int(current * cfg.increase_factor)
                    limit = _max_iops(spec, d)
                    binding = _rate(s, d) >= current * 0.5
                    values.append(
                        0 if not current or not binding or (limit and grown >= limit) else grown
                    )
                cap = IopsCap(*values)
                if not (cap.read_iops or cap.write_iops):
                    del self.caps[vid]
                    changes[vid] = None
                elif cap != old:
                    self.caps[vid] = changes[vid] = cap
        return changes

    def _bursting(self, spec: QosSpec, s: VolumeSample) -> bool:
        cfg = self.config
        return any(
            _rate(s, d) > max(cfg.floor_iops, _min_iops(spec, d) * cfg.healthy_above)
            for d in _DIRECTIONS
        )


class SqueezeLoop:
    """Samples the enforcer's volumes every period and applies the controller's caps."""

    def __init__(
        self,
        enforcer: QosEnforcer,
        config: SqueezeConfig | None = None,
        *,
        sys_root: str = "/sys",
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.enforcer = enforcer
        self.clock = clock
        self.controller = SqueezeController(config or SqueezeConfig())
        self.sys_root = sys_root
        self._prev: dict[str, tuple[float, stats.IoCounters, stats.DeviceCounters | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="qos-squeeze", daemon=True)
            self._thread.start()

    def sample(self) -> tuple[dict[str, VolumeSample], dict[str, QosSpec]]:
        """Rates since the previous call; a volume seen for the first time has none yet."""
        samples: dict[str, VolumeSample] = {}
        specs: dict[str, QosSpec] = {}
        views = self.enforcer.volumes()
        for vid in [v for v in self._prev if v not in views]:
            del self._prev[vid]
        for vid, view in views.items():
            try:
                counters = self.enforcer.counters(vid)
            except NotFound:
                continue
            device = stats.read_device(view.device, self.sys_root)
            now = self.clock()
            prev = self._prev.get(vid)
            self._prev[vid] = (now, counters, device)
            if prev is None:
                continue
            interval = now - prev[0]
            r = stats.rates(prev[1], counters, interval)
            read_q = write_q = None
            if device is not None and prev[2] is not None:
                read_q, write_q = stats.inflight(prev[2], device, interval)
            samples[vid] = VolumeSample(r.read_iops, r.write_iops, read_q, write_q)
            specs[vid] = view.spec
        return samples, specs

    def step(self) -> dict[str, IopsCap | None]:
        samples, specs = self.sample()
        changes = self.controller.step(samples, specs)
        for vid, cap in changes.items():
            log.info("qos squeeze: %s cap %s", vid, cap)
            self.enforcer.set_cap(vid, cap)
        return changes

    def _run(self) -> None:
        while not self._stop.wait(self.controller.config.interval_s):
            try:
                self.step()
            except Exception:  # a bad sample must not end the loop
                log.exception("qos squeeze step failed")

    def close(self) -> None:
        """Stop, and give every squeezed volume its tier's limits back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for vid in list(self.controller.caps):
            self.enforcer.set_cap(vid, None)
        self.controller.caps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
