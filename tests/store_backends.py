"""The two cluster stores behind one test interface, for the contract suite.

Each backend opens stores on the same data (so a test can use several clients, or reopen),
reaches under the store to write raw records, and can crash the writer or the server.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid

from control.etcd_store import EtcdConfig, EtcdStore
from control.sqlite_store import SqliteStore
from control.store import Put
from proto.etcd import rpc_pb2, rpc_pb2_grpc
from tests.etcd_cluster import EtcdCluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SqliteBackend:
    name = "sqlite"

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "cluster.sqlite")
        self.stores: list[SqliteStore] = []

    def open(self) -> SqliteStore:
        store = SqliteStore(self.path)
        self.stores.append(store)
        return store

    def raw_set(self, key: str, data: str) -> None:
        conn = sqlite3.connect(self.path)
        with conn:
            conn.execute("UPDATE records SET data=? WHERE key=?", (data, key))
        conn.close()

    def raw_get(self, key: str) -> str:
        conn = sqlite3.connect(self.path)
        (data,) = conn.execute("SELECT data FROM records WHERE key=?", (key,)).fetchone()
        conn.close()
        return data

    def write_then_crash(self, count: int) -> list[str]:
        """A separate process commits records and is killed with SIGKILL after `count`
        commits have returned; returns the keys it was told were committed."""
        script = (
            "import sys\n"
            "from control.sqlite_store import SqliteStore\n"
            "from control.store import Put\n"
            f"s = SqliteStore({self.path!r})\n"
            "i = 0\n"
            "while True:\n"
            "    s.commit([Put(f'volume/crash-{i:05d}', {'i': i}, expect=0)])\n"
            "    print(i, flush=True)\n"
            "    i += 1\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        acknowledged = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                acknowledged.append(f"volume/crash-{int(line):05d}")
                if len(acknowledged) == count:
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            proc.kill()
            proc.wait()
        return acknowledged

    def close(self) -> None:
        for s in self.stores:
            s.close()


class EtcdBackend:
    name = "etcd"

    def __init__(self, cluster: EtcdCluster, **options: object):
        self.cluster = cluster
        self.namespace = f"/test-{uuid.uuid4().hex[:8]}/"
        self.options = options
        self.stores: list[EtcdStore] = []

    def config(self) -> EtcdConfig:
        return EtcdConfig.from_url(self.cluster.url, namespace=self.namespace, **self.options)

    def open(self) -> EtcdStore:
        store = EtcdStore(self.config())
        self.stores.append(store)
        return store

    def _kv(self) -> tuple[object, rpc_pb2_grpc.KVStub]:
        ch = self.cluster.members[0].channel()
        return ch, rpc_pb2_grpc.KVStub(ch)

    def raw_set(self, key: str, data: str) -> None:
        ch, kv = self._kv()
        with ch:  # type: ignore[attr-defined]
            kv.Put(rpc_pb2.PutRequest(key=f"{self.namespace}kv/{key}".encode(),
                                      value=data.encode()), timeout=5)

    def raw_get(self, key: str) -> str:
        ch, kv = self._kv()
        with ch:  # type: ignore[attr-defined]
            rsp = kv.Range(rpc_pb2.RangeRequest(key=f"{self.namespace}kv/{key}".encode()),
                           timeout=5)
        return rsp.kvs[0].value.decode()

    def raw_keys(self) -> list[bytes]:
        """Every etcd key under this backend's namespace (store records and its own)."""
        ch, kv = self._kv()
        ns = self.namespace.encode()
        with ch:  # type: ignore[attr-defined]
            rsp = kv.Range(rpc_pb2.RangeRequest(key=ns, range_end=ns[:-1] + b"0", keys_only=True),
                           timeout=5)
        return [k.key for k in rsp.kvs]

    def write_then_crash(self, count: int) -> list[str]:
        """Commit records, then SIGKILL every member and start them again: committed means
        on disk."""
        store = self.open()
        keys = [f"volume/crash-{i:05d}" for i in range(count)]
        for i, key in enumerate(keys):
            store.commit([Put(key, {"i": i}, expect=0)])
        for i in range(len(self.cluster.members)):
            self.cluster.kill(i)
        for m in self.cluster.members:
            m.start()
        self.cluster.wait_healthy()
        return keys

    def close(self) -> None:
        for s in self.stores:
            s.close()

