"""`python -m tests.bench.mirror`: mirrored vs unmirrored volume, across namespaces.

Needs root. Runtime about 8 minutes with the defaults (TDM_BENCH_RUNTIME_S=6 seconds per
fio job, TDM_BENCH_ROUNDS=3; 461 to 516 s in five runs on the 2-core VM); quick mode for
development, TDM_BENCH_QUICK=1 (2-second jobs, one round, 256 MiB volumes, no resync/rebuild), about
1.5 minutes. Every figure but resync and rebuild comes from devices measured side by side
in the same run. Prints one JSON line last; only same-run ratios mean anything on a shared
machine.

The rig: three replica services, each in its own zone namespace behind a bridge (veth
pairs, 198.18.0.0/24 only inside the namespaces of this run, named uniquely); the
frontends (FUSE + loop device) in another namespace; fio and the commit probe in the root
namespace on the loop devices. Every device is filled once first (random 4 KiB writes,
each block once), so that all of them overwrite allocated blocks.

What each side does with a 4 KiB write (the comparison is only fair with this in mind):
- local: a loop device with direct I/O on a sparse file on the VM's disk (ext4), as
  Tandem's unmirrored volumes are: the write completes when the virtio disk has it (in its
  volatile cache); a flush (fdatasync of the device) is a flush of the loop device, i.e.
  fsync of the file, i.e. a cache flush of the disk.
- mirrored: a loop device with direct I/O on the FUSE file; the frontend sends the write
  to every replica; each replica applies it with a buffered pwrite (page cache) and
  answers; the write completes when every replica answered. A flush sends SYNC to every
  replica, which fdatasyncs its data file (the page cache goes to the disk, then a cache
  flush) and answers; it completes when every replica answered.
So flush-free rows are NOT like for like: the local volume writes to the disk, the
replicas only to their page cache (both hold the write in volatile memory until a flush,
as a block device may, but the local side does the disk's work at once and the mirrored
side at the next flush). `local` is what a user compares with; `localbuf` (a loop device
without direct I/O on the same disk: page cache until fdatasync, the replicas' durability
work for the same calls) is measured beside it in the flush-free QD32 row, and
`r{N}_over_localbuf_write_qd32` is the like-for-like ratio. Flush-heavy rows make both
sides durable at every commit (the same work for the same call); the tmpfs rows take the
disk out of both sides.

Rows, each in TDM_BENCH_ROUNDS interleaved rounds (every device once per round, the
order rotated per round):
- write_qd32: 4 KiB random writes at QD32, no flush (the historical goal metric).
- commit_qd1: the commit probe, one 4 KiB random O_DIRECT pwrite then fdatasync, one at a
  time, as a database commits: commits/s and p50/p99 of pwrite+fdatasync. The devices take
  turns in 0.2 s slices within a round (TDM_BENCH_RUNTIME_S of slices each): a disk flush
  costs whatever the other work on the shared disk makes it cost at that moment (47 us to
  700 us p50 for the local volume between two 6-second runs), so only commits timed in
  the same seconds compare.
- sync32_qd32: fio 4 KiB random writes at QD32 with fdatasync every 32 writes (fio's
  libaio engine lets the writes in flight complete before each fdatasync): write IOPS.
- tmpfs: replicas' pools and the local volume's file on a tmpfs of this run: fio 4 KiB
  random write at QD1 (latency, the write alone, no flush; fio's total latency, submit
  to completion) and QD32 (IOPS). No disk: what is left is Tandem's data path, FUSE,
  the loop devices and TCP over veth.
The veth round trip is measured at the start and at the end of the run, frontend
namespace to each zone: `veth_rtt_us` is the median ICMP echo, sent back to back as the
QD1 writes are (the kernel's round trip over veth and bridge, no process woken; the
strict reading of "a veth round trip"), and `veth_tcp_echo_us` the median round trip of
a 64-byte TCP message between two processes (both woken), what a replica link costs at
the least. The tmpfs latency budget is `2 * veth_rtt_us + 40`.

Aggregation: fio rows report each device's best round over the local volume's best
round (other work on the shared machine hits whichever device runs at that moment;
best over best is the steadier estimate), latency rows each device's lowest p50 round;
the commit row, measured in the same seconds on every device, the median of its
rounds' ratios (and each device's median round); the per-round (paired) ratios are in
the JSON too (`*_paired`). Flush-free disk rows stay at the mercy of other disk work:
it slows the local volume (disk writes) and hardly the replicas (page cache), so a
round with a busy disk flatters the mirror; compare `local_write_qd32_iops` with a
quiet run's (about 96k on this VM) before believing a QD32 ratio.
On this rig all replicas share one disk, so a disk-bound flush-heavy load cannot exceed
about 1/N of local with N replicas: `r{N}_commit_qd1_of_limit` and
`r{N}_sync32_qd32_of_limit` say where each flush-heavy figure stands against it (1.0 =
at the limit; the goal is 0.8). `goals_met` checks every goal of issue 12. Also: read
IOPS (QD1, QD32) and QD1 write on the disk devices, resync time for 64 MiB dirtied on a
16 GiB volume, full rebuild rate.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from engine import command
from engine.loopdev import LoopDevices
from mirror.frontend import Frontend
from mirror.spec import FrontendTuning, ReplicaAddr, ReplicaState
from mirror.testkit import ReplicaProc, Topology

PORT = 7500
TMPFS_PORT = 7510
# quick mode, for development: short fio jobs, one round, small volumes, no resync/rebuild
QUICK = os.environ.get("TDM_BENCH_QUICK", "") not in ("", "0")
VOL_BYTES = (256 << 20) if QUICK else (1 << 30)
TMPFS_VOL_BYTES = (64 << 20) if QUICK else (256 << 20)
RUNTIME_S = int(os.environ.get("TDM_BENCH_RUNTIME_S", "2" if QUICK else "6"))
ROUNDS = int(os.environ.get("TDM_BENCH_ROUNDS", "1" if QUICK else "3"))
# io_timeout_s: the other sessions' disk load stalled a replica's fdatasync past the default
# 5 s once, and a dropped replica (EIO with both gone) ends or distorts the run: this
# benchmark measures speed, the fault tests measure failures
TUNING = FrontendTuning(io_timeout_s=60.0, reconnect_interval_s=0.2)
DEVICES = ("local", "r2", "r3")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(argv: list[str], timeout_s: float = 60.0) -> str:
    return command.run(argv, timeout_s=timeout_s).stdout


def fio(dev: str, rw: str, qd: int, runtime_s: int = RUNTIME_S, size: int = VOL_BYTES,
        fdatasync: int = 0) -> dict:
    """IOPS and total latency (submission to completion) percentiles in microseconds."""
    argv = [
        "fio",
        "--name=b",
        f"--filename={dev}",
        "--direct=1",
        "--ioengine=libaio",
        f"--rw={rw}",
        "--bs=4k",
        f"--iodepth={qd}",
        f"--runtime={runtime_s}",
        "--time_based",
        "--ramp_time=1",
        f"--size={size}",
        "--randrepeat=0",
        "--norandommap",
        "--lat_percentiles=1",
        "--output-format=json",
    ]
    if fdatasync:
        argv.append(f"--fdatasync={fdatasync}")
    job = json.loads(run(argv, timeout_s=runtime_s + 60))["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    pct = side["lat_ns"].get("percentile", {})
    got = {
        "iops": round(side["iops"]),
        "p50_us": round(pct.get("50.000000", 0) / 1e3, 1),
        "p99_us": round(pct.get("99.000000", 0) / 1e3, 1),
    }
    if fdatasync:  # how long each fdatasync took (fio times it apart from the writes)
        sync_pct = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
        got["sync_p50_us"] = round(sync_pct.get("50.000000", 0) / 1e3, 1)
    return got


def commit_probe(devs: dict[str, str], runtime_s: float, size: int = VOL_BYTES,
                 slice_s: float = 0.2) -> dict:
    """A database's commit, one at a time: a random 4 KiB O_DIRECT pwrite, then fdatasync,
    on every device in turn, slice_s each, for runtime_s per device in all: each device sees
    the shared disk's load of the same seconds (with whole-device runs one after the other,
    another helper's burst of disk I/O decided the ratio). Per device: commits/s over its
    own slices and p50/p99 of pwrite+fdatasync in microseconds (fio reports the write and
    the sync apart, never their sum). Each device's first slice is a warm-up."""
    fds = {k: os.open(dev, os.O_WRONLY | os.O_DIRECT) for k, dev in devs.items()}
    lat: dict[str, list[int]] = {k: [] for k in devs}
    busy_ns = dict.fromkeys(devs, 0)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(os.urandom(4096))
        rng = random.Random(12)
        blocks = size // 4096
        ns = time.perf_counter_ns
        slice_ns = int(slice_s * 1e9)
        slices = max(1, round(runtime_s / slice_s))
        for i in range(slices + 1):
            for k, fd in fds.items():
                got = []
                start = t = ns()
                while t - start < slice_ns:
                    off = rng.randrange(blocks) * 4096
                    t0 = ns()
                    os.pwrite(fd, buf, off)
                    os.fdatasync(fd)
                    t = ns()
                    got.append(t - t0)
                if i:  # the first round of slices warms up
                    lat[k] += got
                    busy_ns[k] += t - start
    finally:
        for fd in fds.values():
            os.close(fd)
    out = {}
    for k, v in lat.items():
        v.sort()
        out[k] = {
            "iops": round(len(v) / (busy_ns[k] / 1e9)),
            "p50_us": round(v[len(v) // 2] / 1e3, 1),
            "p99_us": round(v[min(len(v) - 1, len(v) * 99 // 100)] / 1e3, 1),
        }
    return out


def fill(dev: str, size: int = VOL_BYTES, rw: str = "write", bs: str = "1m", qd: int = 8) -> None:
    """Write every block once (fio's random map covers each block exactly once with randwrite)."""
    run(
        [
            "fio",
            "--name=fill",
            f"--filename={dev}",
            "--direct=1",
            "--ioengine=libaio",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={qd}",
            f"--size={size}",
            "--output-format=json",
        ],
        timeout_s=300,
    )


def rtt_us(netns: str, ip: str, count: int = 200) -> list[float]:
    """ICMP echo round trips from inside a namespace, in microseconds (a child process
    enters it; this image has no ping binary)."""
    out = subprocess.run([sys.executable, "-m", "tests.bench.mirror", "ping", netns, ip,
                          str(count)], cwd=REPO, capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [float(x) for x in out.split()]


def _ping_main(netns_name: str, ip: str, count: int) -> None:
    """Echo requests one at a time; the reply's time is the kernel's receive timestamp
    (SO_TIMESTAMPNS), so waking this process is not counted, as with ping(8)."""
    import socket
    import struct

    from mirror import netns

    netns.enter(netns_name)
    so_timestampns = 35
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setsockopt(socket.SOL_SOCKET, so_timestampns, 1)
    s.settimeout(1.0)
    ident = os.getpid() & 0xFFFF
    got = []
    for seq in range(count):
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(56)
        csum = sum(struct.unpack(f"!{len(body) // 2}H", body))
        csum = (csum >> 16) + (csum & 0xFFFF)
        csum = ~(csum + (csum >> 16)) & 0xFFFF
        pkt = body[:2] + struct.pack("!H", csum) + body[4:]
        t0 = time.time_ns()
        s.sendto(pkt, (ip, 0))
        while True:
            try:
                data, anc, _, _ = s.recvmsg(2048, 64)
            except TimeoutError:
                break
            hl = (data[0] & 0xF) * 4
            typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, hl)
            if typ != 0 or rid != ident or rseq != seq:
                continue
            t1 = next((struct.unpack("qq", d[:16]) for lvl, kind, d in anc
                       if lvl == socket.SOL_SOCKET and kind == so_timestampns), None)
            if t1 is not None:
                got.append((t1[0] * 1_000_000_000 + t1[1] - t0) / 1000)
            break
    print(" ".join(f"{x:.1f}" for x in got))


def tcp_echo_us(client_ns: str, server_ns: str, ip: str, count: int = 2000) -> list[float]:
    """Round trips of a 64-byte TCP message between two processes in two namespaces, in
    microseconds: the veth as a replica link uses it (TCP_NODELAY, both ends woken from a
    blocking recv), without the mirror's own work."""
    out = subprocess.run([sys.executable, "-m", "tests.bench.mirror", "echo", client_ns,
                          server_ns, ip, str(count)], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [float(x) for x in out.split()]


def _echo_main(client_ns: str, server_ns: str, ip: str, count: int) -> None:
    """A socket stays in the namespace it was made in: listen in the server's, connect from
    the client's, then fork so that each end is a process of its own."""
    import socket

    from mirror import netns

    netns.enter(server_ns)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((ip, 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    netns.enter(client_ns)
    c = socket.create_connection((ip, port), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    srv, _ = lsock.accept()
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(64)
    pid = os.fork()
    if pid == 0:  # the server: echo until the client closes
        c.close()
        try:
            while True:
                got = srv.recv(64)
                if not got:
                    break
                srv.sendall(got)
        finally:
            os._exit(0)
    srv.close()
    ns = time.perf_counter_ns
    got_us = []
    for i in range(count + 100):  # the first 100 warm up
        t0 = ns()
        c.sendall(msg)
        n = 0
        while n < len(msg):
            n += len(c.recv(64))
        if i >= 100:
            got_us.append((ns() - t0) / 1000)
    c.close()
    os.waitpid(pid, 0)
    print(" ".join(f"{x:.1f}" for x in got_us))


def profile(dev: str) -> dict:
    """Everything the interleaved rounds do not measure."""
    return {
        "write_qd1": fio(dev, "randwrite", 1),
        "read_qd32": fio(dev, "randread", 32),
        "read_qd1": fio(dev, "randread", 1),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rounds_of(devs: dict[str, str], measure: dict, label: str,
              only: dict[str, tuple[str, ...]] | None = None,
              joint: frozenset[str] = frozenset()) -> list[dict]:
    """ROUNDS interleaved rounds: every (row, device) once per round, order rotated;
    only: the devices of a row that is not measured on all of them; joint: rows whose
    function measures all devices at once (interleaved in time) and returns them by name."""
    names = list(devs)
    out = []
    for i in range(ROUNDS):
        order = names[i % len(names):] + names[: i % len(names)]
        got: dict = {}
        for row, fn in measure.items():
            wanted = (only or {}).get(row, DEVICES)
            if row in joint:
                got[row] = fn({k: devs[k] for k in order if k in wanted})
            else:
                got[row] = {k: fn(devs[k]) for k in order if k in wanted}
            log(f"{label} round {i + 1} {row}: "
                + ", ".join(f"{k} {got[row][k]['iops']} iops p50 {got[row][k]['p50_us']} us"
                            for k in names if k in got[row]))
        out.append(got)
    return out


class Bench:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tdm-mir-bench-", dir="/var/tmp")
        self.topo = Topology(3)
        self.key = os.path.join(self.tmp, "key")
        with open(self.key, "wb") as f:
            f.write(os.urandom(24).hex().encode())
        self.replicas: list[ReplicaProc] = []
        self.tmpfs_replicas: list[ReplicaProc] = []
        self.frontends: list[Frontend] = []
        self.loopdevs = LoopDevices()
        self.loops: list[str] = []
        self.shm = os.path.join(self.tmp, "shm")
        self.shm_mounted = False

    def frontend(self, vid: str, size: int, n: int, first: int = 0,
                 replicas: list[ReplicaProc] | None = None) -> Frontend:
        procs = self.replicas if replicas is None else replicas
        addrs = [
            ReplicaAddr(f"r{i + 1}", procs[i].host, procs[i].port)
            for i in range(first, first + n)
        ]
        fe = Frontend(
            vid,
            size,
            addrs,
            f"sqlite:{self.tmp}/arbiter.db",
            os.path.join(self.tmp, f"fe-{vid}"),
            self.key,
            netns=self.topo.ns("fe"),
            tuning=TUNING,
        )
        self.frontends.append(fe)
        fe.start()
        return fe

    def local(self, path: str, size: int, direct_io: bool = True) -> str:
        with open(path, "wb") as f:
            f.truncate(size)
        dev = self.loopdevs.attach(path, direct_io=direct_io).path
        self.loops.append(dev)
        return dev

    def replica_set(self, root: str, port: int) -> list[ReplicaProc]:
        return [
            ReplicaProc(os.path.join(root, f"pool{i}"), self.topo.ns(f"z{i}"),
                        self.topo.zone_ip(i), port, self.key).start()
            for i in range(1, 4)
        ]

    def rtt(self) -> tuple[list[float], list[float]]:
        """ICMP and TCP echo round trips from the frontends' namespace to every zone."""
        icmp: list[float] = []
        tcp: list[float] = []
        for i in range(1, 4):
            icmp += rtt_us(self.topo.ns("fe"), self.topo.zone_ip(i))
            tcp += tcp_echo_us(self.topo.ns("fe"), self.topo.ns(f"z{i}"), self.topo.zone_ip(i))
        log(f"veth rtt p50: icmp {statistics.median(icmp):.1f} us, "
            f"tcp echo {statistics.median(tcp):.1f} us")
        return icmp, tcp

    def run(self) -> dict:
        self.topo.up()
        res: dict = {}
        rtts, echos = self.rtt()
        self.replicas = self.replica_set(self.tmp, PORT)
        os.makedirs(self.shm)
        run(["mount", "-t", "tmpfs", "-o", "size=3g", "tdm-mir-bench", self.shm])
        self.shm_mounted = True
        self.tmpfs_replicas = self.replica_set(self.shm, TMPFS_PORT)

        disk = {"local": self.local(os.path.join(self.tmp, "local.img"), VOL_BYTES),
                # the same durability work as a replica's for a write: the page cache
                "localbuf": self.local(os.path.join(self.tmp, "localbuf.img"), VOL_BYTES,
                                       direct_io=False)}
        for n in (2, 3):
            disk[f"r{n}"] = self.frontend(f"bench-r{n}", VOL_BYTES, n).device_path  # type: ignore[assignment]
        mem = {"local": self.local(os.path.join(self.shm, "local.img"), TMPFS_VOL_BYTES)}
        for n in (2, 3):
            mem[f"r{n}"] = self.frontend(f"bench-t{n}", TMPFS_VOL_BYTES, n,  # type: ignore[assignment]
                                         replicas=self.tmpfs_replicas).device_path
        # steady state: every block written once (first writes into holes allocate), with the
        # measured pattern: 1 MiB writes would leave large folios in the replicas' page cache,
        # and ext4 (the test pools' filesystem) then walks every block of a folio on each
        # 4 KiB write (docs/mirror.md, "Benchmark")
        for k in DEVICES:
            fill(mem[k], TMPFS_VOL_BYTES, rw="randwrite", bs="4k", qd=32)
        for k in disk:
            fill(disk[k], rw="randwrite", bs="4k", qd=32)

        res["disk"] = rounds_of(disk, {
            "write_qd32": lambda d: fio(d, "randwrite", 32),
            "commit_qd1": lambda ds: commit_probe(ds, RUNTIME_S),
            "sync32_qd32": lambda d: fio(d, "randwrite", 32, fdatasync=32),
        }, "disk", only={"write_qd32": DEVICES + ("localbuf",)}, joint=JOINT_ROWS)
        res["tmpfs"] = rounds_of(mem, {
            "write_qd1": lambda d: fio(d, "randwrite", 1, size=TMPFS_VOL_BYTES),
            "write_qd32": lambda d: fio(d, "randwrite", 32, size=TMPFS_VOL_BYTES),
        }, "tmpfs")
        for k in DEVICES:
            res[k] = profile(disk[k])
            log(f"{k} {res[k]}")
        end_rtts, end_echos = self.rtt()
        res["rtt_us"] = rtts + end_rtts
        res["tcp_echo_us"] = echos + end_echos
        for fe in list(self.frontends):
            fe.stop()
        if not QUICK:
            res["resync_s_64m_of_16g"] = self.resync()
            res["rebuild_mb_s"] = self.rebuild()
        return res

    def resync(self) -> float:
        fe = self.frontend("bench-resync", 16 << 30, 2)
        assert fe.device_path
        self.replicas[1].kill()
        fd = os.open(fe.device_path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 20)
        buf.write(os.urandom(1 << 20))
        for off in random.Random(1).sample(range(16 << 10), 64):  # 64 x 1 MiB spread over 16 GiB
            os.pwrite(fd, buf, off << 20)
        os.fsync(fd)
        os.close(fd)
        t0 = time.monotonic()
        self.replicas[1].start()
        fe.wait_in_sync(120)
        took = time.monotonic() - t0
        log(f"resync of 64 MiB dirty on 16 GiB: {took:.2f}s (includes reconnect)")
        fe.stop()
        return round(took, 3)

    def rebuild(self) -> float:
        size = 512 << 20
        fe = self.frontend("bench-rebuild", size, 2)
        assert fe.device_path
        fill(fe.device_path, size)
        t0 = time.monotonic()
        fe.replace_replica("r2", ReplicaAddr("r3", self.replicas[2].host, self.replicas[2].port))
        deadline = time.monotonic() + 300
        while True:
            st = fe.status()
            if (
                all(r.state == ReplicaState.IN_SYNC and r.connected for r in st.replicas)
                and len(st.replicas) == 2
            ):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        took = time.monotonic() - t0
        rate = size / (1 << 20) / took
        log(f"full rebuild of {size >> 20} MiB written data: {took:.2f}s = {rate:.0f} MB/s")
        fe.stop()
        return round(rate, 1)

    def dump_logs(self) -> None:
        """The frontends' and replicas' logs, tails, to stderr: a failed run's evidence
        (cleanup deletes them)."""
        for root, _dirs, files in os.walk(self.tmp):
            for name in files:
                if name in ("worker.log", "replica.log"):
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        tail = f.read()[-4000:].decode(errors="replace")
                    log(f"--- {path} (tail)\n{tail}")

    def cleanup(self) -> None:
        for fe in self.frontends:
            try:
                fe.stop()
            except Exception as e:  # keep cleaning
                log(f"cleanup: {e}")
        for dev in self.loops:
            try:
                self.loopdevs.detach(dev)
            except Exception as e:  # keep cleaning
                log(f"cleanup: {e}")
        for r in self.replicas + self.tmpfs_replicas:
            r.kill()
        self.topo.down()
        if self.shm_mounted:
            command.run(["umount", self.shm], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


JOINT_ROWS = frozenset({"commit_qd1"})


def best(rounds: list[dict], row: str, dev: str, key: str = "iops") -> float:
    """A device's figure for a row: its best round; for rows measured on all devices at
    once (interleaved in time), its median round."""
    vals = [r[row][dev][key] for r in rounds]
    if row in JOINT_ROWS:
        return statistics.median(vals)
    return max(vals) if key == "iops" else min(vals)


def ratio(rounds: list[dict], row: str, dev: str) -> float:
    """A device's IOPS over the local volume's: best over best; for rows measured on all
    devices at once, the median of the rounds' (paired) ratios."""
    if row in JOINT_ROWS:
        return statistics.median(
            r[row][dev]["iops"] / max(r[row]["local"]["iops"], 1) for r in rounds)
    return best(rounds, row, dev) / max(best(rounds, row, "local"), 1)


def summarize(res: dict) -> dict:
    disk, mem, loc = res["disk"], res["tmpfs"], res["local"]
    rtt = statistics.median(res["rtt_us"])
    s: dict = {
        "rounds": len(disk),
        "runtime_s_per_job": RUNTIME_S,
        "veth_rtt_us": round(rtt, 1),
        "veth_rtt_p99_us": round(sorted(res["rtt_us"])[len(res["rtt_us"]) * 99 // 100], 1),
        "veth_tcp_echo_us": round(statistics.median(res["tcp_echo_us"]), 1),
        "local_write_qd32_iops": best(disk, "write_qd32", "local"),
        "localbuf_write_qd32_iops": best(disk, "write_qd32", "localbuf"),
        "local_commit_qd1_per_s": best(disk, "commit_qd1", "local"),
        "local_commit_qd1_p50_us": best(disk, "commit_qd1", "local", "p50_us"),
        "local_commit_qd1_p99_us": best(disk, "commit_qd1", "local", "p99_us"),
        "local_sync32_qd32_iops": best(disk, "sync32_qd32", "local"),
        "local_sync32_fdatasync_p50_us": best(disk, "sync32_qd32", "local", "sync_p50_us"),
        "local_write_qd1_iops": loc["write_qd1"]["iops"],
        "local_write_qd1_p99_us": loc["write_qd1"]["p99_us"],
        "local_read_qd32_iops": loc["read_qd32"]["iops"],
        "local_read_qd1_iops": loc["read_qd1"]["iops"],
        "tmpfs_local_write_qd1_p50_us": best(mem, "write_qd1", "local", "p50_us"),
        "tmpfs_local_write_qd32_iops": best(mem, "write_qd32", "local"),
    }
    for n in (2, 3):
        r = f"r{n}"
        for row, name in (("write_qd32", "write_qd32"), ("commit_qd1", "commit_qd1"),
                          ("sync32_qd32", "sync32_qd32")):
            got = ratio(disk, row, r)
            s[f"{r}_over_local_{name}"] = round(got, 3)
            s[f"{r}_over_local_{name}_paired"] = [
                round(x[row][r]["iops"] / max(x[row]["local"]["iops"], 1), 3) for x in disk]
            if row == "write_qd32":  # against the local volume doing a replica's work
                s[f"{r}_over_localbuf_{name}"] = round(
                    best(disk, row, r) / max(best(disk, row, "localbuf"), 1), 3)
            if row != "write_qd32":
                s[f"{r}_{name}_of_limit"] = round(got * n, 3)  # the rig's limit is 1/n
        s[f"{r}_write_qd32_iops"] = best(disk, "write_qd32", r)
        s[f"{r}_commit_qd1_per_s"] = best(disk, "commit_qd1", r)
        s[f"{r}_commit_qd1_p50_us"] = best(disk, "commit_qd1", r, "p50_us")
        s[f"{r}_commit_qd1_p99_us"] = best(disk, "commit_qd1", r, "p99_us")
        s[f"{r}_sync32_qd32_iops"] = best(disk, "sync32_qd32", r)
        s[f"{r}_sync32_fdatasync_p50_us"] = best(disk, "sync32_qd32", r, "sync_p50_us")
        for k in ("write_qd1", "read_qd32", "read_qd1"):
            s[f"{r}_{k}_iops"] = res[r][k]["iops"]
            s[f"{r}_over_local_{k}"] = round(res[r][k]["iops"] / max(loc[k]["iops"], 1), 3)
        s[f"{r}_write_qd1_p50_us"] = res[r]["write_qd1"]["p50_us"]
        s[f"{r}_write_qd1_p99_us"] = res[r]["write_qd1"]["p99_us"]
        # tmpfs: the data path alone
        p50 = best(mem, "write_qd1", r, "p50_us")
        overhead = p50 - s["tmpfs_local_write_qd1_p50_us"]
        s[f"tmpfs_{r}_write_qd1_p50_us"] = p50
        s[f"{r}_qd1_latency_overhead_us_tmpfs"] = round(overhead, 1)
        s[f"{r}_qd1_latency_overhead_us_tmpfs_paired"] = [
            round(x["write_qd1"][r]["p50_us"] - x["write_qd1"]["local"]["p50_us"], 1) for x in mem]
        s[f"{r}_qd1_latency_budget_us_tmpfs"] = round(2 * rtt + 40, 1)
        s[f"tmpfs_{r}_write_qd32_iops"] = best(mem, "write_qd32", r)
        s[f"tmpfs_{r}_over_local_write_qd32"] = round(
            best(mem, "write_qd32", r) / max(s["tmpfs_local_write_qd32_iops"], 1), 3)
    s["goals_met"] = {
        "r2_write_qd32_0.85": s["r2_over_local_write_qd32"] >= 0.85,
        "r3_write_qd32_0.80": s["r3_over_local_write_qd32"] >= 0.80,
        **{f"r{n}_qd1_latency_tmpfs": s[f"r{n}_qd1_latency_overhead_us_tmpfs"]
           <= s[f"r{n}_qd1_latency_budget_us_tmpfs"] for n in (2, 3)},
        **{f"r{n}_{row}_0.8_of_limit": s[f"r{n}_{row}_of_limit"] >= 0.8
           for n in (2, 3) for row in ("commit_qd1", "sync32_qd32")},
    }
    s["quick"] = QUICK
    for k in ("resync_s_64m_of_16g", "rebuild_mb_s"):
        if k in res:
            s[k] = res[k]
    return s


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "ping":  # the RTT probe's child process
        _ping_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "echo":  # the TCP echo probe's child process
        _echo_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if os.geteuid() != 0:
        sys.exit("needs root")
    t0 = time.monotonic()
    b = Bench()
    try:
        res = b.run()
    except BaseException:
        b.dump_logs()
        raise
    finally:
        b.cleanup()
    summary = summarize(res)
    summary["bench_s"] = round(time.monotonic() - t0)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
