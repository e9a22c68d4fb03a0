"""The backup client against the real radosgw through a TCP relay that misbehaves as
object stores and their networks do: it answers the first requests with 503 Slow Down
(the client must retry with backoff, then succeed), or all of them (a clear Unavailable
naming the target), and it counts connections open at once (bounded concurrency)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from engine.backup.s3 import MAX_ATTEMPTS, Bucket
from engine.backup.targets import Credentials, ObjectStore, Target
from engine.errors import Unavailable
from tests.rgw import Bucket as TestBucket

MIB = 1024 * 1024
SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 0\r\n"
             b"Connection: close\r\n\r\n")


class Relay:
    """127.0.0.1:PORT -> radosgw. The first `refuse` connections get a 503 to their first
    request and are closed; the others are relayed both ways."""

    def __init__(self, upstream: tuple[str, int], refuse: int = 0):
        self.upstream, self.refuse = upstream, refuse
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.refused = self.open = self.most_open = 0
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            refuse = self.refused < self.refuse
            self.refused += refuse
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            if refuse:
                conn.recv(65536)  # the request's head: answered without reaching radosgw
                conn.sendall(SLOW_DOWN)
                return
            up = socket.create_connection(self.upstream, timeout=30)
            pump = threading.Thread(target=self._pump, args=(up, conn), daemon=True)
            pump.start()
            self._pump(conn, up)
            pump.join(30)
            up.close()
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.closing = True
        self.listener.close()


@pytest.fixture
def bucket(rgw):
    b = TestBucket(rgw)
    yield b
    b.close()


def through(relay: Relay, rgw, bucket: TestBucket, **kw) -> Bucket:
    store = ObjectStore(
        Target("offsite", f"http://127.0.0.1:{relay.port}", bucket.name),
        Credentials(rgw.access_key, rgw.secret_key, "k" * 64))
    return Bucket(store, **kw)


def test_slow_down_answers_are_retried_with_backoff_until_the_upload_succeeds(rgw, bucket):
    relay = Relay((rgw.host, rgw.rgw_port), refuse=3)
    try:
        data = os.urandom(MIB)
        through(relay, rgw, bucket).put("retried", data)
        assert relay.refused == 3
        assert bucket.get("retried") == data
    finally:
        relay.close()


def test_a_store_that_never_recovers_is_a_clear_unavailable(rgw, bucket):
    relay = Relay((rgw.host, rgw.rgw_port), refuse=10 * MAX_ATTEMPTS)
    try:
        with pytest.raises(Unavailable, match=r"upload of gone: offsite .* answered"):
            through(relay, rgw, bucket).put("gone", b"x" * 1024)
        # bounded: it gives up after botocore's MAX_ATTEMPTS (one more request seen here:
        # 9 PUTs for 8 attempts, the cause not pinned down)
        assert MAX_ATTEMPTS <= relay.refused <= MAX_ATTEMPTS + 1
    finally:
        relay.close()


def test_a_multipart_upload_keeps_its_connections_bounded(rgw, bucket):
    relay = Relay((rgw.host, rgw.rgw_port))
    try:
        s3 = through(relay, rgw, bucket, max_connections=3, multipart_threshold=5 * MIB,
                     part_bytes=5 * MIB)
        data = os.urandom(40 * MIB)  # 8 parts
        s3.put("big", data)
        assert s3.get("big", 17 * MIB, 18 * MIB) == data[17 * MIB:18 * MIB]
        assert 1 <= relay.most_open <= 3
    finally:
        relay.close()
