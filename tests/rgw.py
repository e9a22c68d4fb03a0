"""A real S3 server for tests: Ceph's radosgw on loopback, over one monitor and one OSD.

    with RadosGateway(tmp_dir) as rgw:
        rgw.endpoint, rgw.access_key, rgw.secret_key   # an S3 user made with radosgw-admin

    # or inside a network namespace of a test topology, serving S3 on its address:
    rgw = RadosGateway(tmp_dir, netns="tdm-cl-1234-x2", host="198.18.0.102").start()
    rgw.call(lambda: boto3.client("s3", endpoint_url=rgw.endpoint, ...).list_buckets())

Debian's ceph-mon, ceph-osd and radosgw (16.2), no systemd, no cephadm, no ceph-mgr: the
monitor and a memstore OSD (objects in the OSD's memory) come up in a few seconds on free
loopback ports, with everything under a temp dir. What it takes here (measured):
- with authentication off, radosgw still needs `ms mon client mode = crc secure`, or it
  retries its monitor session forever;
- short paxos intervals make the pool creations radosgw does at start fast;
- stop radosgw, then the OSD, then the monitor (any other order takes minutes);
- a stopped daemon can linger as a zombie here: wait on /proc/PID/stat, not kill -0;
- a memstore OSD reports `memstore device bytes` as its size (1 GiB unless raised);
- RGW's garbage collection waits 2 hours unless `rgw gc obj min wait` is lowered.
Every daemon also dies with the process that started it (`setpriv --pdeathsig`).

In a namespace, every daemon and command runs there (`nsenter --net`): the monitor and
the OSD on its loopback, radosgw on `host`, so the namespace's neighbours reach it and
nothing is added to the root namespace. The test process reaches it through `call`: a
thread that entered the namespace (a socket belongs to the namespace it was made in).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import TypeVar

from mirror import netns as namespaces
from tests.etcd_cluster import DIE_WITH_PARENT, free_ports

GIB = 1024**3
T = TypeVar("T")
BINARIES = ("/usr/bin/ceph-mon", "/usr/bin/ceph-osd", "/usr/bin/radosgw",
            "/usr/bin/radosgw-admin", "/usr/bin/monmaptool", "/usr/bin/ceph")


def _exited(pid: int) -> bool:
    """Gone or a zombie (kill -0 still succeeds on a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class RadosGateway:
    def __init__(self, root: str, *, memstore_bytes: int = 1 * GIB, netns: str = "",
                 host: str = "127.0.0.1"):
        """netns: the network namespace to run in ("": this one); host: radosgw's
        address there (loopback unless in a namespace)."""
        missing = [b for b in BINARIES if not os.path.exists(b)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing: apt-get install ceph-mon "
                               "ceph-osd radosgw (scripts/install.sh --dev does)")
        self.root = os.path.join(root, f"ceph-{uuid.uuid4().hex[:6]}")
        os.makedirs(os.path.join(self.root, "run"))
        self.mon_port, self.rgw_port = free_ports(2)
        self.memstore_bytes = memstore_bytes
        self.netns, self.host = netns, host
        # in a namespace, the test's own S3 calls run on one thread that entered it
        self._caller: concurrent.futures.ThreadPoolExecutor | None = None
        if netns:
            self._caller = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="rgw-netns", initializer=namespaces.enter,
                initargs=(netns,))
        self.conf = os.path.join(self.root, "ceph.conf")
        self.fsid = str(uuid.uuid4())
        self.procs: dict[str, subprocess.Popen] = {}
        self.access_key = "TDM" + uuid.uuid4().hex[:17].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.rgw_port}"

    def call(self, fn: Callable[[], T]) -> T:
        """fn() where radosgw can be reached: in its namespace when it has one."""
        if self._caller is None:
            return fn()
        return self._caller.submit(fn).result()

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv] if self.netns \
            else argv

    def _write_conf(self) -> None:
        r = self.root
        conf = f"""
[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.mon_port}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/$name.log
keyring = {r}/keyring
mon data = {r}/$name
osd data = {r}/$name
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
paxos propose interval = 0.05
paxos min wait = 0.01
mon osd full ratio = 0.99
mon osd backfillfull ratio = 0.99
mon osd nearfull ratio = 0.99
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd op num shards = 2
osd op num threads per shard = 2
[client.rgw.t]
rgw frontends = beast endpoint={self.host}:{self.rgw_port}
rgw data = {r}/rgw
rgw gc obj min wait = 10
rgw gc processor period = 10
rgw dns name = {self.host}
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _run(self, argv: list[str], timeout_s: float = 60.0) -> str:
        proc = subprocess.run(self._in_netns(argv), capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(os.path.join(self.root, f"{name}.out"), "ab") as out:
            self.procs[name] = subprocess.Popen(DIE_WITH_PARENT + self._in_netns(argv),
                                                stdout=out,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)

    def _ceph(self, *args: str, timeout_s: float = 30.0) -> str:
        return self._run(["ceph", "-c", self.conf, "--connect-timeout", "20", *args],
                         timeout_s=timeout_s)

    def start(self, timeout_s: float = 60.0) -> RadosGateway:
        try:
            self._start(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        r, c = self.root, self.conf
        self._write_conf()
        monmap = os.path.join(r, "monmap")
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{self.mon_port}]", monmap])
        self._run(["ceph-mon", "-c", c, "--mkfs", "-i", "a", "--monmap", monmap])
        self._daemon("mon", ["ceph-mon", "-c", c, "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        os.makedirs(os.path.join(r, f"osd.{osd_id}"))
        self._run(["ceph-osd", "-c", c, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        self._daemon("osd", ["ceph-osd", "-c", c, "-f", "-i", osd_id])
        os.makedirs(os.path.join(r, "rgw"))
        self._daemon("rgw", ["radosgw", "-c", c, "-f", "-n", "client.rgw.t"])
        self._wait_rgw(timeout_s)
        self._run(["radosgw-admin", "-c", c, "-n", "client.rgw.t", "user", "create",
                   "--uid", "tandem", "--display-name", "tandem",
                   "--access-key", self.access_key, "--secret", self.secret_key])

    def _wait_rgw(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self.log(name)}")
            if self.call(self._serving):
                return
            time.sleep(0.1)
        raise TimeoutError(f"radosgw not serving in {timeout_s}s: {self.log('rgw')}")

    def _serving(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=1) as rsp:
                return rsp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self, name: str) -> str:
        parts = []
        for path in (f"{name}.out", "client.rgw.t.log" if name == "rgw" else f"{name}.a.log"):
            try:
                with open(os.path.join(self.root, path), errors="replace") as f:
                    parts.append(f.read()[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def stop_daemon(self, name: str, timeout_s: float = 30.0) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _exited(proc.pid):
            proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        del self.procs[name]

    def close(self) -> None:
        # radosgw, then the OSD, then the monitor: any other order takes minutes
        for name in ("rgw", "osd", "mon"):
            self.stop_daemon(name)
        if self._caller is not None:
            self._caller.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RadosGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def s3_client(rgw: RadosGateway):
    """A boto3 client of the gateway's S3 user (as engine/backup/s3.py configures one)."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=rgw.endpoint, aws_access_key_id=rgw.access_key,
        aws_secret_access_key=rgw.secret_key, region_name="us-east-1",
        config=botocore.config.Config(request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required",
                                      s3={"addressing_style": "path"}))


class Bucket:
    """A bucket of its own on the gateway, for one test; close() empties and removes it.
    Every call goes where the gateway is reached (rgw.call)."""

    def __init__(self, rgw: RadosGateway, name: str = ""):
        self.rgw = rgw
        self.s3 = s3_client(rgw)
        self.name = name or f"tdm-{uuid.uuid4().hex[:12]}"
        rgw.call(lambda: self.s3.create_bucket(Bucket=self.name))

    def objects(self, prefix: str = "") -> dict[str, int]:
        def listing() -> dict[str, int]:
            out = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                          Prefix=prefix):
                out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            return out
        return self.rgw.call(listing)

    def packs(self) -> dict[str, int]:
        return {k: v for k, v in self.objects().items() if "/packs/" in k}

    def get(self, key: str) -> bytes:
        return self.rgw.call(
            lambda: self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())

    def put(self, key: str, data: bytes) -> None:
        self.rgw.call(lambda: self.s3.put_object(Bucket=self.name, Key=key, Body=data))

    def delete(self, key: str) -> None:
        self.rgw.call(lambda: self.s3.delete_object(Bucket=self.name, Key=key))

    def close(self) -> None:
        keys = list(self.objects())
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self.rgw.call(lambda b=batch: self.s3.delete_objects(Bucket=self.name,
                                                                 Delete={"Objects": b}))
        self.rgw.call(lambda: self.s3.delete_bucket(Bucket=self.name))
