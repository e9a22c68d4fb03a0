"""Test and benchmark support: zones as network namespaces, replica processes,
a verified-data writer and a mirrored volume across zones (Cluster). Used by
tests/integration and tests/bench only.

Addresses come from 198.18.0.0/15 (benchmark range) and exist only inside the
namespaces created here: a bridge in a namespace of its own, one veth per zone.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable

from engine import command

from .frontend import Frontend, _package_root
from .spec import FrontendTuning, ReplicaAddr, ReplicaState

BLOCK = 4096


def run(argv: list[str], timeout_s: float = 30.0) -> str:
    return command.run(argv, timeout_s=timeout_s).stdout


class Topology:
    """Namespaces <prefix>-br (bridge), <prefix>-fe, <prefix>-z1..zN and, for tests that
    need another peer (a connection flood), <prefix>-x1..xM."""

    def __init__(self, zones: int, prefix: str | None = None, extra_hosts: int = 0):
        self.prefix = prefix or f"tdm-mir-{uuid.uuid4().hex[:6]}"
        self.zones = zones
        self.extra_hosts = extra_hosts
        self.created: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def zone_ip(self, i: int) -> str:
        return f"198.18.0.{10 + i}"

    def host_ip(self, i: int) -> str:
        return f"198.18.0.{100 + i}"

    fe_ip = "198.18.0.1"

    def up(self) -> Topology:
        br = self.ns("br")
        self._add(br)
        run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", br, "link", "set", "br0", "up"])
        zone_ips = [(f"z{i}", self.zone_ip(i)) for i in range(1, self.zones + 1)]
        host_ips = [(f"x{i}", self.host_ip(i)) for i in range(1, self.extra_hosts + 1)]
        for name, ip in [("fe", self.fe_ip)] + zone_ips + host_ips:
            ns = self.ns(name)
            self._add(ns)
            # created inside the namespaces: no names or addresses ever in the root namespace
            run(["ip", "-n", br, "link", "add", f"v{name}", "type", "veth",
                 "peer", "name", "eth0", "netns", ns])
            run(["ip", "-n", br, "link", "set", f"v{name}", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return self

    def _add(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self.created.append(ns)

    def cut(self, zone: int) -> None:
        """Silent partition: the bridge port goes down, packets vanish (no RST, no ICMP)."""
        run(["ip", "-n", self.ns("br"), "link", "set", f"vz{zone}", "down"])

    def heal(self, zone: int) -> None:
        run(["ip", "-n", self.ns("br"), "link", "set", f"vz{zone}", "up"])

    def down(self) -> None:
        for ns in reversed(self.created):
            command.run(["ip", "netns", "del", ns], check=False)
        self.created.clear()


class ReplicaProc:
    """A replica service process in a zone; kill() is a SIGKILL, start() brings it back."""

    def __init__(self, pool_dir: str, netns: str | None, host: str, port: int, key_path: str,
                 test_delay_ms: float = 0.0, nofile: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        """nofile: the process's descriptor limit (RLIMIT_NOFILE), to make EMFILE happen."""
        self.pool_dir, self.netns, self.host, self.port = pool_dir, netns, host, port
        self.key_path, self.delay = key_path, test_delay_ms
        self.nofile, self.extra_args = nofile, tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ReplicaProc:
        argv = [sys.executable, "-m", "mirror.replica_main", "--pool", self.pool_dir,
                "--listen", f"{self.host}:{self.port}", "--key-file", self.key_path,
                "--test-delay-ms", str(self.delay)]
        if self.netns:
            argv += ["--netns", self.netns]
        argv += list(self.extra_args)
        os.makedirs(self.pool_dir, exist_ok=True)
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                     # the parent's copy of the log fd stays open (unchanged)
                                     stderr=open(  # noqa: SIM115
                                         os.path.join(self.pool_dir, "replica.log"), "ab"),
                                     cwd=_package_root(), start_new_session=True,
                                     preexec_fn=limit if nofile is not None else None)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"listening"):
            self.kill()  # never leave it behind: the caller has no handle on it yet
            raise RuntimeError(f"replica did not start: {line!r}")
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def threads(self) -> int:
        """Threads of the replica process now (from /proc)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise RuntimeError("no Threads line")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def data_path(self, volume_id: str) -> str:
        return os.path.join(self.pool_dir, volume_id, "data")


class Flood:
    """`count` TCP connections to a replica service, made from inside a namespace (a
    subprocess entered it) and held open until stop(): silent ones that never answer the
    server's hello, or, with key_path, ones that pass the handshake and then sit idle.
    `connected` and `authenticated` say how many got that far."""

    def __init__(self, netns: str, host: str, port: int, count: int,
                 key_path: str | None = None):
        self.argv = [sys.executable, "-m", "mirror.testkit", "flood", "--netns", netns,
                     "--target", f"{host}:{port}", "--count", str(count)]
        if key_path:
            self.argv += ["--key-file", key_path]
        self.proc: subprocess.Popen | None = None
        self.connected = self.authenticated = 0

    def start(self) -> Flood:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=_package_root(), start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != b"holding":
            self.stop()
            raise RuntimeError(f"flood did not start: {line!r}")
        self.connected, self.authenticated = int(line[1]), int(line[2])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # it closes every connection and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _flood_main(argv: list[str]) -> None:
    """The Flood subprocess: enter the namespace, connect, report, hold until stdin ends."""
    import argparse
    import socket

    from . import auth, netns

    p = argparse.ArgumentParser()
    p.add_argument("--netns", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--key-file")
    args = p.parse_args(argv)
    netns.enter(args.netns)
    host, _, port = args.target.rpartition(":")
    key = auth.load_key(args.key_file) if args.key_file else None
    held: list[socket.socket] = []
    counts = {"connected": 0, "authenticated": 0}
    lock = threading.Lock()

    def one() -> None:
        deadline = time.monotonic() + 1.5
        while True:  # authenticated: retried like a real client (caps refuse bursts)
            try:
                s = socket.create_connection((host, int(port)), timeout=2.0)
            except OSError:
                if key is None or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
                continue
            if key is None:
                break
            try:
                auth.client_handshake(s, key)
            except (OSError, auth.AuthFailed):
                s.close()
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
                continue
            with lock:
                counts["authenticated"] += 1
            break
        with lock:
            held.append(s)
            counts["connected"] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args.count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    print(f"holding {counts['connected']} {counts['authenticated']}", flush=True)
    sys.stdin.read()
    for s in held:
        s.close()


def release_tree(root: str) -> None:
    """Lazily unmount every mount below root and detach every loop device whose file is
    below it (what a failed frontend stop may leave); the files, logs included, stay."""
    from engine.loopdev import LoopDevices
    from engine.mounts import Mounts

    root = os.path.realpath(root)
    for dev in LoopDevices().all():
        if dev.backing_file.startswith(root + "/"):
            command.run(["losetup", "-d", dev.path], check=False)
    for m in sorted(Mounts().table(), key=lambda m: -len(m.target)):
        if m.target == root or m.target.startswith(root + "/"):
            command.run(["umount", "-l", m.target], check=False)


def file_sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 << 20))
            if not chunk:
                h.update(bytes(left))  # a short sparse file reads as zeros
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def make_block(blk: int, seq: int) -> bytes:
    """Self-describing block: index, sequence, crc32 of the rest."""
    body = struct.pack("<QQ", blk, seq) + random.randbytes(BLOCK - 20)
    return body + struct.pack("<I", zlib.crc32(body))


class VerifiedWriter:
    """Threads writing self-checking 4 KiB blocks with O_DIRECT; remembers what was acked.

    Each thread owns a disjoint set of blocks, so an acknowledged block has exactly
    one expected content. A failed write leaves its block unknown until the next
    acknowledged one: it may or may not have reached the replicas, so verify()
    accepts either the last acknowledged content or any failed attempt since.
    Every I/O error is recorded (most tests require none), and so is the time
    of every acknowledgement (ack_times, monotonic), for tests that must see none
    during a fault.
    """

    def __init__(self, dev: str, blocks: int, threads: int = 4, fsync_every: int = 64,
                 first_block: int = 0):
        """Writes blocks first_block .. first_block + blocks - 1 (writers on disjoint
        ranges can run side by side)."""
        self.dev, self.blocks, self.threads, self.fsync_every = dev, blocks, threads, fsync_every
        self.first_block = first_block
        self.acked: dict[int, bytes] = {}
        self.unknown: dict[int, list[bytes]] = {}  # failed attempts since the last ack
        self.errors: list[str] = []
        self.ack_times: list[float] = []
        self.writes = 0
        self._stop = threading.Event()
        self._ts: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> VerifiedWriter:
        for t in range(self.threads):
            th = threading.Thread(target=self._run, args=(t,), daemon=True)
            th.start()
            self._ts.append(th)
        return self

    def _run(self, t: int) -> None:
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        rnd = random.Random(t)
        mine = range(self.first_block + t, self.first_block + self.blocks, self.threads)
        seq = 0
        try:
            while not self._stop.is_set():
                blk = rnd.choice(mine)
                seq += 1
                data = make_block(blk, seq)
                buf.seek(0)
                buf.write(data)
                try:
                    os.pwrite(fd, buf, blk * BLOCK)
                except OSError as e:
                    with self._lock:
                        self.errors.append(f"block {blk}: {e}")
                        self.unknown.setdefault(blk, []).append(data)
                    time.sleep(0.05)
                    continue
                now = time.monotonic()
                with self._lock:
                    self.acked[blk] = data
                    self.unknown.pop(blk, None)
                    self.ack_times.append(now)
                    self.writes += 1
                if seq % self.fsync_every == 0:
                    try:
                        os.fsync(fd)
                    except OSError as e:  # the write itself was acknowledged
                        with self._lock:
                            self.errors.append(f"fsync: {e}")
                        time.sleep(0.05)
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        for th in self._ts:
            th.join(30)

    def wait_writes(self, n: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        start = self.writes
        while self.writes - start < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.writes - start} writes in {timeout_s}s")
            time.sleep(0.02)

    def acks_after(self, t: float) -> int:
        """Writes acknowledged after monotonic time t."""
        with self._lock:
            return sum(1 for a in self.ack_times if a > t)

    def landed(self, path: str) -> int:
        """How many of this writer's blocks in the file at path hold one of its blocks
        (its index and a good CRC), acknowledged or not."""
        n = 0
        with open(path, "rb") as f:
            for blk in range(self.first_block, self.first_block + self.blocks):
                f.seek(blk * BLOCK)
                b = f.read(BLOCK)
                if (len(b) == BLOCK and struct.unpack_from("<Q", b)[0] == blk
                        and struct.unpack_from("<I", b, BLOCK - 4)[0] == zlib.crc32(b[:-4])):
                    n += 1
        return n

    def verify(self, path: str, direct: bool = False) -> list[int]:
        """Blocks whose content is neither the last acknowledged write nor a failed one since."""
        bad = []
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, BLOCK)
        try:
            for blk, data in self.acked.items():
                os.preadv(fd, [buf], blk * BLOCK)
                got = bytes(buf)
                if got != data and got not in self.unknown.get(blk, ()):
                    bad.append(blk)
        finally:
            os.close(fd)
        return bad


class Cluster:
    """A mirrored volume across zones: a Topology, one replica process per zone and a
    Frontend in the frontend namespace. down() undoes everything, even half-made."""

    def __init__(self, tmp: str, zones: int = 2, delay_ms: float = 0.0, port: int = 7400,
                 size_bytes: int = 64 * 1024 * 1024, tuning: FrontendTuning | None = None,
                 replica_nofile: int | None = None, replica_args: tuple[str, ...] = (),
                 extra_hosts: int = 0):
        assert os.geteuid() == 0, "needs root"
        self.tmp = str(tmp)
        self.topo = Topology(zones, extra_hosts=extra_hosts)
        self.key = os.path.join(self.tmp, "key")
        with open(self.key, "wb") as f:
            f.write(os.urandom(24).hex().encode())
        os.chmod(self.key, 0o600)
        self.replicas: list[ReplicaProc] = []
        self.fe: Frontend | None = None
        self.delay_ms, self.port, self.size = delay_ms, port, size_bytes
        self.tuning = tuning or FrontendTuning(io_timeout_s=1.5, reconnect_interval_s=0.3)
        self.replica_nofile, self.replica_args = replica_nofile, replica_args
        self.volume_id = "vol-t"

    def up(self, volume_id: str = "vol-t", replicas: int | None = None) -> str:
        """Zones, replica processes (the first `replicas` of them in the volume) and the
        frontend; returns the device path."""
        self.volume_id = volume_id
        self.topo.up()
        for i in range(1, self.topo.zones + 1):
            self.replicas.append(ReplicaProc(
                os.path.join(self.tmp, f"pool{i}"), self.topo.ns(f"z{i}"), self.topo.zone_ip(i),
                self.port, self.key, test_delay_ms=self.delay_ms, nofile=self.replica_nofile,
                extra_args=self.replica_args).start())
        used = self.replicas[:replicas or len(self.replicas)]
        self.fe = Frontend(volume_id, self.size, [self.addr(i) for i in range(len(used))],
                           f"sqlite:{self.tmp}/arbiter.db", os.path.join(self.tmp, "fe"),
                           self.key, netns=self.topo.ns("fe"), tuning=self.tuning)
        return self.fe.start()

    def addr(self, i: int) -> ReplicaAddr:
        """Replica i (0-based) of the volume: id r<i+1> in zone i+1."""
        r = self.replicas[i]
        return ReplicaAddr(f"r{i + 1}", r.host, r.port)

    def down(self) -> None:
        try:
            if self.fe is not None:
                self.fe.stop()
        finally:
            for r in self.replicas:
                r.kill()
            self.topo.down()

    def state(self, rid: str) -> ReplicaState:
        assert self.fe is not None
        return next(r.state for r in self.fe.status().replicas if r.replica_id == rid)

    def wait_state(self, rid: str, st: ReplicaState, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.state(rid) != st:
            assert time.monotonic() < deadline, f"{rid} never became {st}"
            time.sleep(0.05)

    def check(self, w: VerifiedWriter, allow_errors: bool = False,
              replicas: list[ReplicaProc] | None = None,
              also: tuple[VerifiedWriter, ...] = ()) -> None:
        """Everything in sync, every acknowledged block (of w and of the writers in `also`)
        on the device and on every replica's file, identical replica files. Stops the
        frontend (cleanly) to compare the files."""
        assert self.fe is not None and self.fe.device_path
        writers = (w, *also)
        if not allow_errors:
            for x in writers:
                assert not x.errors, f"the application saw I/O errors: {x.errors[:5]}"
        self.fe.wait_in_sync(60)
        for x in writers:
            assert x.verify(self.fe.device_path, direct=True) == [], (
                "acknowledged writes lost (device)")
        self.fe.stop()  # clean stop: replicas quiesced before comparing files
        for r in replicas if replicas is not None else self.replicas:
            for x in writers:
                assert x.verify(r.data_path(self.volume_id)) == [], (
                    f"acknowledged writes lost on {r.pool_dir}")
        sums = {file_sha256(r.data_path(self.volume_id), self.size)
                for r in (replicas if replicas is not None else self.replicas)}
        assert len(sums) == 1, "replicas differ"


def fault_sequence(c: Cluster, seed: int, steps: int, say: Callable[[str], None] = print,
                   frontend_kills: float = 0.35) -> list[str]:
    """Replica faults chosen by a seeded generator, one per step: a zone cut or healed
    (silent: no reset), two zones cut a moment apart, a replica SIGKILLed or started
    again; after each, with
    probability frontend_kills, the frontend worker is SIGKILLed at a random point and
    started again a moment later. Ends with every zone healed, every replica running and
    a worker up. Returns what was done (also passed to say, as it happens)."""
    assert c.fe is not None
    rnd = random.Random(seed)
    zones = c.topo.zones
    cut: set[int] = set()
    dead: set[int] = set()
    done: list[str] = []

    def note(what: str) -> None:
        done.append(what)
        say(f"[seed {seed}] {time.monotonic():.2f} {what}")

    for _ in range(steps):
        z = rnd.randint(1, zones)
        kind = rnd.random()
        if kind < 0.3:
            # a burst: two zones cut a moment apart (a shared switch, say), before the
            # first one has timed out
            for i, zz in enumerate(rnd.sample(range(1, zones + 1), 2)):
                if i:
                    time.sleep(rnd.uniform(0.1, 0.9 * c.tuning.io_timeout_s))
                if zz not in cut:
                    c.topo.cut(zz)
                    cut.add(zz)
                    note(f"cut z{zz}")
        elif kind < 0.65:
            if z in cut:
                c.topo.heal(z)
                cut.discard(z)
                note(f"heal z{z}")
            else:
                c.topo.cut(z)
                cut.add(z)
                note(f"cut z{z}")
        elif z in dead:
            c.replicas[z - 1].start()
            dead.discard(z)
            note(f"start r{z}")
        else:
            c.replicas[z - 1].kill()
            dead.add(z)
            note(f"kill r{z}")
        pause = rnd.uniform(0.1, 1.2 * c.tuning.io_timeout_s)  # faults overlap often
        if rnd.random() < frontend_kills:
            # at a random point: half the time before the fault can be noticed, half the
            # time after (the replica dropped, or I/O failing)
            first = rnd.choice([rnd.uniform(0, pause),
                                pause + rnd.uniform(1.0, 1.4) * c.tuning.io_timeout_s])
            time.sleep(first)
            c.fe.kill_worker()
            note("kill the frontend")
            time.sleep(rnd.uniform(0, 0.5))
            c.fe.start_worker()
            note("frontend back")
            time.sleep(max(0.0, pause - first))
        else:
            time.sleep(pause)
    for z in sorted(cut):
        c.topo.heal(z)
        note(f"heal z{z}")
    for z in sorted(dead):
        c.replicas[z - 1].start()
        note(f"start r{z}")
    return done


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        _flood_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m mirror.testkit flood --netns NS --target HOST:PORT --count N "
                 "[--key-file F]")
