"""The node's IOPS capacity: the budget guaranteed minima are admitted against (admission.py).

One fio run of 3 seconds gave anything from 3,100 to 9,500 IOPS on a shared VM, and the first
figure was kept forever: a low one made the gold tier impossible on that node for good. So:

- **What runs**: fio on a scratch file in the pool (never on a volume): 4 KiB random 50/50
  read/write, direct I/O, JOBS jobs x IODEPTH (one job per core of a small node, so one busy
  core does not halve the figure), on a FILE_BYTES file (no-CoW on btrfs, as volume files
  are) so that no cache holds it; IOPS logged every second.
- **Warm-up**: WARMUP_S seconds, left out. A new file's first seconds of random writes ran
  30-60% faster than what followed on the test VM (for 5 to 40 s); a second run on the same
  file showed no such phase.
- **The figure**: the median of the next RUN_S per-second totals (anything fio logs past the
  end left out). The median, not the mean: up to half the seconds can be disturbed, either
  way, without moving it, so one noisy second (a stall, a burst) does not count. Conservative
  where it matters: a load beside the measurement lowers every second, so it can only lower
  the figure, and the mix (small, random, half writes) is the hardest common one. A low
  percentile (p25) was tried on recorded runs: it moved up to twice as much as the median
  between runs (other sessions' bursts hit a quarter of the seconds more often than half).
- **When**: once, at the driver's first start (WARMUP_S + RUN_S seconds plus writing the
  file: ~45 s), or when an operator asks (`tandem-admin capacity measure`); never at every
  start. An operator can also set the figure (`tandem-admin capacity set`), and
  `--node-iops-capacity` sets it at each start. The record keeps the figure, its source, the
  method, the date and the per-second samples.
"""

from __future__ import annotations

import glob
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engine import fileops
from engine.errors import CommandFailed
from engine.qos import fio
from engine.state import Store

FILE_BYTES = 1024**3
WARMUP_S = 10
RUN_S = 30
JOBS = 2
IODEPTH = 32
MIN_SAMPLES = 3
SCRATCH_PREFIX = ".qos-capacity-"

KIND, KEY = "pool-info", "iops_capacity"  # where the figure is kept in the state store
MEASURED, OPERATOR, FLAG = "measured", "tandem-admin set", "--node-iops-capacity"
LEGACY_METHOD = "one fio run of 3 s, 256 MiB file (before 0.1.0's stable measurement)"


@dataclass(frozen=True)
class Capacity:
    """The figure admission uses, with where it came from."""

    iops: int
    source: str  # MEASURED, OPERATOR or FLAG
    method: str
    measured_at: float  # unix time; 0 when unknown (a record from before dates were kept)
    samples: tuple[int, ...] = ()  # the per-second totals a measurement kept

    def record(self) -> dict:
        return {"iops": self.iops, "source": self.source, "method": self.method,
                "measured_at": self.measured_at, "samples": list(self.samples)}

    @classmethod
    def from_record(cls, rec: dict) -> Capacity:
        if "method" not in rec:  # written by the single 3-second run of earlier builds
            return cls(int(rec["iops"]), MEASURED, LEGACY_METHOD, 0.0)
        return cls(int(rec["iops"]), rec["source"], rec["method"], float(rec["measured_at"]),
                   tuple(int(s) for s in rec.get("samples", ())))

    @property
    def date(self) -> str:
        """When it was measured or set, in UTC (ISO 8601); "unknown" for old records."""
        if not self.measured_at:
            return "unknown"
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at))

    @property
    def legacy(self) -> bool:
        return self.method == LEGACY_METHOD


def load(store: Store) -> Capacity | None:
    rec = store.get(KIND, KEY)
    return Capacity.from_record(rec) if rec else None


def save(store: Store, cap: Capacity) -> None:
    store.put(KIND, KEY, cap.record())


def warmup_for(seconds: int) -> int:
    """The warm-up before `seconds` of measurement: a third of it, WARMUP_S at most."""
    return max(1, min(WARMUP_S, seconds // 3))


def describe(seconds: int, warmup_s: int, file_bytes: int, jobs: int, iodepth: int) -> str:
    return (f"fio 4 KiB random 50/50 read/write, direct I/O, {jobs} jobs x iodepth {iodepth}, "
            f"{file_bytes // 1024**2} MiB scratch file in the pool; median of the per-second "
            f"IOPS over {seconds} s after {warmup_s} s of warm-up")


def steady_samples(per_interval: Mapping[int, float], warmup_s: int,
                   seconds: int) -> list[float]:
    """The samples of the measured seconds, in time order: not the warm-up's, nor any fio
    logged past the run's end (a last interval cut short)."""
    return [iops for i, iops in sorted(per_interval.items()) if warmup_s < i <= warmup_s + seconds]


def capacity_from_samples(samples: Sequence[float]) -> int:
    """The figure from the per-second IOPS of a measurement: their median."""
    if len(samples) < MIN_SAMPLES:
        raise ValueError(f"{len(samples)} per-second samples, {MIN_SAMPLES} needed")
    return int(statistics.median(samples))


def remove_scratch(pool_dir: str) -> None:
    """Scratch files a measurement cut short (a crash, a kill) left in the pool."""
    for path in glob.glob(os.path.join(glob.escape(pool_dir), SCRATCH_PREFIX + "*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def measure(pool_dir: str, *, seconds: int = RUN_S, warmup_s: int | None = None,
            file_bytes: int = FILE_BYTES, jobs: int = JOBS, iodepth: int = IODEPTH,
            clock: Callable[[], float] = time.time) -> Capacity:
    """Measure the pool's capacity (see the module's docstring). Takes warmup_s + seconds
    plus writing the scratch file once; CommandFailed if fio fails or logs too little."""
    warmup_s = warmup_for(seconds) if warmup_s is None else warmup_s
    remove_scratch(pool_dir)
    fd, path = tempfile.mkstemp(prefix=SCRATCH_PREFIX, dir=pool_dir)  # 0600
    os.close(fd)
    try:
        try:
            fileops.set_nocow(path)  # btrfs: overwritten in place, as volume files are
        except OSError:
            pass  # not btrfs: nothing to set
        with tempfile.TemporaryDirectory(prefix="tandem-capacity-") as logs:
            job = fio.FioJob(filename=path, rw="randrw", runtime_s=warmup_s + seconds,
                             iodepth=iodepth, numjobs=jobs, size_bytes=file_bytes,
                             name="capacity", iops_log=os.path.join(logs, "capacity"))
            fio.run(job)
            per_interval = fio.read_iops_log(job)
    finally:
        os.unlink(path)
    samples = steady_samples(per_interval, warmup_s, seconds)
    try:
        iops = capacity_from_samples(samples)
    except ValueError as e:
        raise CommandFailed(job.argv(), 0, "", f"fio's IOPS log: {e}") from None
    method = describe(seconds, warmup_s, file_bytes, jobs, iodepth)
    return Capacity(iops, MEASURED, method, clock(), tuple(round(s) for s in samples))
