"""Test and benchmark support: zones as network namespaces, replica processes,
and a verified-data writer. Used by tests/integration and tests/bench only.

Addresses come from 198.18.0.0/15 (benchmark range) and exist only inside the
namespaces created here: a bridge in a namespace of its own, one veth per zone.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib

from engine import command

from .frontend import _package_root

BLOCK = 4096


def run(argv: list[str], timeout_s: float = 30.0) -> str:
    return command.run(argv, timeout_s=timeout_s).stdout


class Topology:
    """Namespaces <prefix>-br (bridge), <prefix>-fe and <prefix>-z1..zN."""

    def __init__(self, zones: int, prefix: str | None = None):
        self.prefix = prefix or f"tdm-mir-{uuid.uuid4().hex[:6]}"
        self.zones = zones
        self.created: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def zone_ip(self, i: int) -> str:
        return f"198.18.0.{10 + i}"

    fe_ip = "198.18.0.1"

    def up(self) -> Topology:
        br = self.ns("br")
        self._add(br)
        run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", br, "link", "set", "br0", "up"])
        zone_ips = [(f"z{i}", self.zone_ip(i)) for i in range(1, self.zones + 1)]
        for name, ip in [("fe", self.fe_ip)] + zone_ips:
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
                 test_delay_ms: float = 0.0):
        self.pool_dir, self.netns, self.host, self.port = pool_dir, netns, host, port
        self.key_path, self.delay = key_path, test_delay_ms
        self.proc: subprocess.Popen | None = None

    def start(self) -> ReplicaProc:
        argv = [sys.executable, "-m", "mirror.replica_main", "--pool", self.pool_dir,
                "--listen", f"{self.host}:{self.port}", "--key-file", self.key_path,
                "--test-delay-ms", str(self.delay)]
        if self.netns:
            argv += ["--netns", self.netns]
        os.makedirs(self.pool_dir, exist_ok=True)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                     # the parent's copy of the log fd stays open (unchanged)
                                     stderr=open(  # noqa: SIM115
                                         os.path.join(self.pool_dir, "replica.log"), "ab"),
                                     cwd=_package_root(), start_new_session=True)
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def data_path(self, volume_id: str) -> str:
        return os.path.join(self.pool_dir, volume_id, "data")


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
    one expected content. Any I/O error is recorded: the tests require none.
    """

    def __init__(self, dev: str, blocks: int, threads: int = 4, fsync_every: int = 64):
        self.dev, self.blocks, self.threads, self.fsync_every = dev, blocks, threads, fsync_every
        self.acked: dict[int, bytes] = {}
        self.errors: list[str] = []
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
        mine = range(t, self.blocks, self.threads)
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
                    if seq % self.fsync_every == 0:
                        os.fsync(fd)
                except OSError as e:
                    with self._lock:
                        self.errors.append(f"block {blk}: {e}")
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.acked[blk] = data
                    self.writes += 1
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

    def verify(self, path: str, direct: bool = False) -> list[int]:
        """Blocks whose content differs from the last acknowledged write."""
        bad = []
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, BLOCK)
        try:
            for blk, data in self.acked.items():
                os.preadv(fd, [buf], blk * BLOCK)
                if bytes(buf) != data:
                    bad.append(blk)
        finally:
            os.close(fd)
        return bad
