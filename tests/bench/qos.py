"""Benchmark of per-volume IOPS tiers on real loop devices and real cgroup v1 blkio.

    python -m tests.bench.qos [--seconds 10] [--tiers gold,silver,bronze]

Prints, per tier, the limit and the measured IOPS (4 KiB random read and write, direct I/O)
and their ratio; the guaranteed volume's IOPS alone, beside a noisy neighbour at full speed
without the squeeze loop, and with it; the unthrottled volume against the raw loop device.
The last line is one JSON object (limit_accuracy_worst, guaranteed_kept_ratio,
unthrottled_over_raw, ...).

`Lab` is also the fixture of tests/integration/test_qos_blkio.py: loop devices on a sparse
pool under /var/tmp and a kubelet-like tree under /sys/fs/cgroup/blkio/tandem-test-<random>,
all undone by cleanup() even after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from engine.qos import fio
from engine.qos.fio import FioJob, FioResult
from engine.qos.limits import Device
from engine.qos.squeeze import SqueezeConfig, SqueezeLoop
from engine.qos.throttle import QosEnforcer
from engine.qos.tiers import DEFAULT_TIERS, QosSpec

CGROUP_ROOT = "/sys/fs/cgroup"
BLKIO = os.path.join(CGROUP_ROOT, "blkio")
MIB = 1024 * 1024
_ENV = {**os.environ, "LC_ALL": "C"}


def _run(argv: list[str], timeout_s: float = 60.0) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=timeout_s, env=_ENV
    ).stdout


@dataclass
class FioProcess:
    proc: subprocess.Popen[str]
    job: FioJob

    def wait(self, timeout_s: float | None = None) -> FioResult:
        limit = timeout_s if timeout_s is not None else self.job.runtime_s + self.job.ramp_s + 60
        out, err = self.proc.communicate(timeout=limit)
        if self.proc.returncode != 0:
            raise RuntimeError(f"fio exited {self.proc.returncode}: {err.strip()[-500:]}")
        return fio.parse_json(out)

    def running(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Lab:
    """Test resources with their undo steps; cleanup() runs them all, newest first."""

    pool_dir: str = ""
    parent_name: str = field(default_factory=lambda: f"tandem-test-{uuid.uuid4().hex[:10]}")
    _loops: list[str] = field(default_factory=list)
    _cgroups: list[str] = field(default_factory=list)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool_dir = tempfile.mkdtemp(prefix="tandem-qos-", dir="/var/tmp")
        self.parent_dir = self.mkcgroup(os.path.join(BLKIO, self.parent_name))

    # --- resources ---------------------------------------------------------------------
    def loop(self, size_bytes: int = 128 * MIB, fill: bool = False) -> tuple[str, Device]:
        """A sparse (or, with fill, written) file on a loop device with direct I/O."""
        fd, path = tempfile.mkstemp(prefix="vol-", suffix=".img", dir=self.pool_dir)
        os.close(fd)
        if fill:  # real blocks, so reads reach the disk instead of returning holes
            _run(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={path}",
                    "bs=1M",
                    f"count={size_bytes // MIB}",
                    "oflag=direct",
                    "status=none",
                ],
                timeout_s=300,
            )
        else:
            os.truncate(path, size_bytes)
        dev = _run(["losetup", "--find", "--show", "--direct-io=on", path]).strip()
        self._loops.append(dev)
        name = os.path.basename(dev)
        with open(f"/sys/block/{name}/dev", encoding="ascii") as f:
            major, minor = (int(x) for x in f.read().split(":"))
        return dev, (major, minor)

    def mkcgroup(self, path: str) -> str:
        os.mkdir(path)
        self._cgroups.append(path)
        return path

    def pod(self, uid: str | None = None, qos: str = "burstable") -> tuple[str, str]:
        """A kubelet-like (cgroupfs driver) pod cgroup: returns (uid, directory)."""
        uid = uid or str(uuid.uuid4())
        parts = ["kubepods"] + ([qos] if qos else []) + [f"pod{uid}"]
        path = self.parent_dir
        for part in parts:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                self.mkcgroup(path)
        return uid, path

    def container(self, pod_dir: str, name: str | None = None) -> str:
        return self.mkcgroup(os.path.join(pod_dir, name or uuid.uuid4().hex))

    def start_fio(self, cgroup_dir: str, job: FioJob) -> FioProcess:
        """fio in `cgroup_dir`: a shell puts itself in the cgroup, then becomes fio."""
        procs = os.path.join(cgroup_dir, "cgroup.procs")
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *job.argv()]
        p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_ENV,
            start_new_session=True,  # its own group, so cleanup reaches fio's job processes
        )
        self._procs.append(p)
        return FioProcess(p, job)

    def enforcer(self, **kw: object) -> QosEnforcer:
        return QosEnforcer(CGROUP_ROOT, kubelet_parent=self.parent_name, **kw)  # type: ignore[arg-type]

    # --- undo --------------------------------------------------------------------------
    def stop(self, p: FioProcess) -> None:
        _kill(p.proc)

    def cleanup(self) -> list[str]:
        """Undo everything; returns what could not be undone (for the test to report)."""
        problems: list[str] = []
        for p in reversed(self._procs):
            _kill(p)
        self._procs.clear()
        for path in sorted(self._cgroups, key=lambda p: p.count("/"), reverse=True):
            for _ in range(200):  # processes just killed may take a moment to leave
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                problems.append(f"cgroup {path} not removed")
        self._cgroups.clear()
        for dev in reversed(self._loops):
            try:
                _run(["losetup", "-d", dev])
            except subprocess.CalledProcessError as e:
                problems.append(f"{dev}: {e.stderr.strip()}")
        self._loops.clear()
        shutil.rmtree(self.pool_dir, ignore_errors=True)
        return problems


def _kill(p: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """SIGKILL the process group we started and wait until all of it is gone: fio's job
    processes may need a while to drain I/O still queued behind a throttle."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        p.communicate(timeout=timeout_s)
    except (subprocess.TimeoutExpired, ValueError):
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(p.pid, 0)  # the group's job processes, reparented when fio died
        except ProcessLookupError:
            return
        time.sleep(0.05)


# --- the benchmark ----------------------------------------------------------------------


def _measure(lab: Lab, cgroup: str, dev: str, rw: str, seconds: float, **kw: object) -> float:
    job = FioJob(dev, rw, runtime_s=seconds, ramp_s=min(2.0, seconds / 4), **kw)  # type: ignore[arg-type]
    r = lab.start_fio(cgroup, job).wait()
    return r.read_iops if rw == "randread" else r.write_iops


def bench(seconds: float, tiers: list[str], out=sys.stdout) -> dict[str, float]:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    lab = Lab()
    enf = lab.enforcer(rebalance_interval_s=0.5)
    squeeze: SqueezeLoop | None = None
    try:
        say(f"pool {lab.pool_dir}; cgroups {lab.parent_dir}; windows {seconds:g} s")
        # 1. Tier accuracy: one pod (its pod cgroup plus one container), one volume.
        dev, dev_id = lab.loop(256 * MIB, fill=True)
        uid, pod = lab.pod()
        ctr = lab.container(pod)
        # Warm-up: the device, and the enforcer's split, which learns in one period that the
        # container (not the pod cgroup) does the I/O; until then each holds half.
        enf.apply("vol-tier", uid, dev_id, QosSpec())
        lab.start_fio(ctr, FioJob(dev, "randrw", runtime_s=1, iodepth=16)).wait()
        worst = 0.0
        say(f"{'tier':8} {'dir':5} {'limit':>7} {'measured':>9} {'ratio':>6}")
        for name in tiers:
            spec = DEFAULT_TIERS[name]
            enf.apply("vol-tier", uid, dev_id, spec)
            for rw, limit in (("randread", spec.max_read_iops), ("randwrite", spec.max_write_iops)):
                got = _measure(lab, ctr, dev, rw, seconds, iodepth=16)
                ratio = got / limit if limit else float("nan")
                if limit:
                    worst = max(worst, abs(ratio - 1))
                say(f"{name:8} {rw[4:]:5} {limit:7d} {got:9.0f} {ratio:6.3f}")
        enf.remove("vol-tier", uid)

        # 2. Unthrottled volume against the raw loop device (no cgroup rule at all), in
        # ABBA order so that a linear drift of the machine's other load cancels out.
        raws, frees = [], []
        enf.apply("vol-tier", uid, dev_id, QosSpec())
        for in_pod in (False, True, True, False):
            where, into = (ctr, frees) if in_pod else (lab.parent_dir, raws)
            into.append(_measure(lab, where, dev, "randread", seconds, iodepth=16))
        enf.remove("vol-tier", uid)
        raw, unthrottled = sum(raws) / 2, sum(frees) / 2
        say(
            f"raw loop device {raw:.0f} IOPS; unthrottled volume {unthrottled:.0f} IOPS "
            f"({unthrottled / raw:.3f})"
        )

        # 3. A guaranteed volume beside a noisy neighbour on the same pool.
        g_dev, g_id = lab.loop(256 * MIB, fill=True)
        n_dev, n_id = lab.loop(256 * MIB, fill=True)
        g_uid, g_pod = lab.pod(qos="")
        n_uid, n_pod = lab.pod(qos="besteffort")
        g_ctr, n_ctr = lab.container(g_pod), lab.container(n_pod)
        enf.apply("vol-noisy", n_uid, n_id, QosSpec("noisy"))
        g_job = {"iodepth": 4}
        enf.apply("vol-g", g_uid, g_id, QosSpec())
        alone = _measure(lab, g_ctr, g_dev, "randread", seconds, **g_job)
        minimum = int(alone * 0.5)  # the guarantee: half of what it does alone
        g_spec = QosSpec("guaranteed", min_read_iops=minimum)
        enf.apply("vol-g", g_uid, g_id, g_spec)
        noisy_job = FioJob(n_dev, "randrw", runtime_s=3 * seconds + 30, iodepth=32, numjobs=2)
        noisy = lab.start_fio(n_ctr, noisy_job)
        time.sleep(1.0)
        without = _measure(lab, g_ctr, g_dev, "randread", seconds, **g_job)
        squeeze = SqueezeLoop(enf, SqueezeConfig(interval_s=0.5))
        time.sleep(2.0)  # let it converge before the window opens
        with_squeeze = _measure(lab, g_ctr, g_dev, "randread", seconds, **g_job)
        cap = enf.volumes()["vol-noisy"].cap
        squeeze.close()
        squeeze = None
        lab.stop(noisy)
        say(
            f"guaranteed volume: alone {alone:.0f} IOPS, minimum {minimum}; beside the noisy "
            f"one {without:.0f} without the squeeze loop, {with_squeeze:.0f} with it "
            f"(noisy capped at {cap})"
        )

        result = {
            "window_s": seconds,
            "limit_accuracy_worst": round(worst, 4),
            "guaranteed_min_iops": minimum,
            "guaranteed_alone_iops": round(alone),
            "guaranteed_noisy_unsqueezed_iops": round(without),
            "guaranteed_noisy_squeezed_iops": round(with_squeeze),
            "guaranteed_kept_ratio": round(with_squeeze / minimum, 4) if minimum else None,
            "guaranteed_unsqueezed_ratio": round(without / minimum, 4) if minimum else None,
            "raw_iops": round(raw),
            "unthrottled_iops": round(unthrottled),
            "unthrottled_over_raw": round(unthrottled / raw, 4),
        }
        return result  # type: ignore[return-value]
    finally:
        if squeeze is not None:
            squeeze.close()
        enf.close()
        problems = lab.cleanup()
        if problems:
            print("cleanup problems: " + "; ".join(problems), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.qos", description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window (10)")
    ap.add_argument("--tiers", default="gold,silver,bronze")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (loop devices, cgroups)", file=sys.stderr)
        return 2
    result = bench(args.seconds, [t for t in args.tiers.split(",") if t])
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
