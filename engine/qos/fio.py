"""Running fio for IOPS measurements (node capacity, benchmark, tests) and reading its JSON
and its per-interval IOPS logs."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass

from engine import command
from engine.errors import CommandFailed


@dataclass(frozen=True)
class FioJob:
    filename: str
    rw: str  # randread | randwrite | randrw
    runtime_s: float = 2.0
    block_size_bytes: int = 4096
    iodepth: int = 1
    numjobs: int = 1
    ioengine: str = "libaio"
    size_bytes: int = 0  # 0: the whole device or file
    rwmixread_percent: int = 50
    ramp_s: float = 0.0  # excluded from the figures
    name: str = "qos"
    iops_log: str = ""  # path prefix: IOPS per interval go to PREFIX_iops*.log
    log_interval_ms: int = 1000

    def argv(self) -> list[str]:
        argv = [
            "fio",
            f"--name={self.name}",
            f"--filename={self.filename}",
            f"--rw={self.rw}",
            f"--bs={self.block_size_bytes}",
            f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}",
            f"--ioengine={self.ioengine}",
            "--direct=1",
            "--thread",  # jobs as threads: one process, so one kill stops it all
            "--time_based",
            f"--runtime={self.runtime_s:g}s",
            "--group_reporting",
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ]
        if self.size_bytes:
            argv.append(f"--size={self.size_bytes}")
        if self.rw == "randrw":
            argv.append(f"--rwmixread={self.rwmixread_percent}")
        if self.ramp_s:
            argv.append(f"--ramp_time={self.ramp_s:g}s")
        if self.iops_log:
            argv += [f"--write_iops_log={self.iops_log}", f"--log_avg_msec={self.log_interval_ms}"]
        return argv


@dataclass(frozen=True)
class FioResult:
    read_iops: float
    write_iops: float
    read_bytes_per_s: float
    write_bytes_per_s: float

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops


def parse_json(text: str) -> FioResult:
    # fio may print warnings before the JSON document.
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    doc = json.loads(text[start:])
    read = write = 0.0
    read_bw = write_bw = 0.0
    for job in doc["jobs"]:
        read += float(job["read"]["iops"])
        write += float(job["write"]["iops"])
        read_bw += float(job["read"]["bw_bytes"])
        write_bw += float(job["write"]["bw_bytes"])
    return FioResult(read, write, read_bw, write_bw)


def parse_iops_log(text: str, interval_ms: int) -> dict[int, float]:
    """IOPS per interval index from one fio IOPS log ("msec, value, direction, bs, offset"),
    read and write added together."""
    totals: dict[int, float] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].strip():
            continue
        index = round(int(fields[0]) / interval_ms)
        totals[index] = totals.get(index, 0.0) + float(fields[1])
    return totals


def read_iops_log(job: FioJob) -> dict[int, float]:
    """The job's total IOPS per interval (1: the first interval), all its jobs' log files
    added."""
    totals: dict[int, float] = {}
    for path in sorted(glob.glob(f"{glob.escape(job.iops_log)}_iops*.log")):
        with open(path, encoding="ascii") as f:
            for index, iops in parse_iops_log(f.read(), job.log_interval_ms).items():
                totals[index] = totals.get(index, 0.0) + iops
    return dict(sorted(totals.items()))


def run(job: FioJob, timeout_s: float | None = None) -> FioResult:
    """Run the job to its end; CommandFailed if fio fails or its output cannot be read."""
    argv = job.argv()
    limit = timeout_s if timeout_s is not None else job.runtime_s + job.ramp_s + 60.0
    proc = command.run(argv, timeout_s=limit)
    try:
        return parse_json(proc.stdout)
    except (ValueError, KeyError) as e:
        raise CommandFailed(argv, 0, proc.stdout, f"unreadable fio output: {e}") from None
