"""A synchronous etcd v3 client on grpcio and stubs generated from etcd's own protos.

One channel per endpoint; calls go to the endpoint that last answered and move to the
next one when a member is down, stopped or cut off from the quorum. Every call has a
deadline: the whole operation (`timeout_s`) and each attempt on one member
(`attempt_timeout_s`, shorter, so a stopped member cannot eat the whole budget).

Failures are classified once, here:
- not sent (the member could not be reached): safe to try the next member;
- maybe sent (timeout, connection lost, "leader changed"): an idempotent call moves on,
  a write raises MaybeApplied for the store to resolve (control/etcd_store.py);
- final (bad request, compacted, lease not found, ...): raised as a domain error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from control.store import Compacted
from engine import waits
from engine.errors import NotFound, OutOfCapacity, Unavailable
from proto.etcd import rpc_pb2_grpc

DEFAULT_PORT = 2379
MAX_MESSAGE_BYTES = 64 << 20

_CHANNEL_OPTIONS = [
    # a restarted member is used again within a second, not after gRPC's default 120 s backoff
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # notice dead connections (etcd refuses pings more often than every 5 s)
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # our own connections: another client's reconnect backoff to a member is not ours
    ("grpc.use_local_subchannel_pool", 1),
]
_FINAL = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to talk to it. Build it with from_url()."""

    endpoints: tuple[str, ...]  # "host:port"
    tls: bool = False
    ca_file: str | None = None  # None with tls: the system's roots
    cert_file: str | None = None  # client certificate (etcd --client-cert-auth)
    key_file: str | None = None
    namespace: str = "/tandem/"  # every key the store writes starts with this
    timeout_s: float = 5.0  # one store operation, failover and outcome resolution included
    attempt_timeout_s: float = 2.0  # one RPC to one member
    max_txn_ops: int = 128  # etcd --max-txn-ops

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: no endpoints")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd: a client certificate needs its key, and a key its certificate")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("etcd: certificates given for a plain etcd:// URL; use etcds://")
        if not self.namespace or self.timeout_s <= 0 or self.attempt_timeout_s <= 0:
            raise ValueError("etcd: namespace must be non-empty and timeouts positive")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdConfig:
        """etcd://host:port,host:port (plain) or etcds://... (TLS; pass ca_file, cert_file,
        key_file as options). Other options: namespace, timeout_s, attempt_timeout_s."""
        parts = urlsplit(url)
        if parts.scheme not in ("etcd", "etcds"):
            raise ValueError(f"etcd URL {url!r}: the scheme is etcd:// or etcds://")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"etcd URL {url!r}: only host:port[,host:port...] may follow ://")
        endpoints = tuple(_endpoint(e, url) for e in parts.netloc.split(","))
        return cls(endpoints=endpoints, tls=parts.scheme == "etcds", **options)


def _endpoint(text: str, url: str) -> str:
    text = text.strip()
    host, port = text, DEFAULT_PORT
    if text.startswith("["):  # [v6]:port
        close = text.find("]")
        if close < 0:
            raise ValueError(f"etcd URL {url!r}: bad IPv6 endpoint {text!r}")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest:
            port = _port(rest.removeprefix(":"), url)
    elif ":" in text:
        host, _, p = text.rpartition(":")
        port = _port(p, url)
    if not host or host == "[]":
        raise ValueError(f"etcd URL {url!r}: empty host in {text!r}")
    return f"{host}:{port}"


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"etcd URL {url!r}: bad port {text!r}")
    return int(text)


class MaybeApplied(Exception):
    """A write was sent and no answer came back: it may or may not have been applied."""

    def __init__(self, endpoint: str, error: grpc.RpcError):
        self.endpoint = endpoint
        self.error = error
        super().__init__(f"{endpoint}: {_describe(error)}")


class EtcdRejected(RuntimeError):
    """etcd refused a request as malformed (a bug on our side, not a state of the cluster)."""


def _describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'error'}: {details}"


def _not_sent(error: grpc.RpcError) -> bool:
    """True when gRPC never had a connection to send the request on."""
    details = (error.details() or "") if hasattr(error, "details") else ""
    return error.code() == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect to all addresses" in details or "Connection refused" in details
    ) or error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in details


def final_error(error: grpc.RpcError) -> Exception:
    """The domain error for an answer that retrying cannot change."""
    code, details = error.code(), error.details() or ""
    if "too large" in details or "larger than max" in details:
        return EtcdRejected(f"etcd refused a message too large ({details}): etcd takes "
                            "requests up to --max-request-bytes (1.5 MiB by default)")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(0, f"etcd: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"etcd: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OutOfCapacity(f"etcd: {details}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return Unavailable(f"etcd refused our credentials: {details}")
    return EtcdRejected(f"etcd rejected the request: {code.name}: {details}")


class EtcdClient:
    """Channels to every endpoint and the call loop with failover."""

    def __init__(self, config: EtcdConfig):
        self.config = config
        creds = self._credentials() if config.tls else None
        self._channels: list[grpc.Channel] = []
        self._stubs: list[dict[str, Any]] = []
        for endpoint in config.endpoints:
            channel = (grpc.secure_channel(endpoint, creds, options=_CHANNEL_OPTIONS)
                       if creds else grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS))
            self._channels.append(channel)
            self._stubs.append({
                "KV": rpc_pb2_grpc.KVStub(channel),
                "Watch": rpc_pb2_grpc.WatchStub(channel),
                "Lease": rpc_pb2_grpc.LeaseStub(channel),
                "Maintenance": rpc_pb2_grpc.MaintenanceStub(channel),
            })
        self._preferred = 0
        self._lock = threading.Lock()
        self._closed = False

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        c = self.config
        return grpc.ssl_channel_credentials(read(c.ca_file), read(c.key_file), read(c.cert_file))

    def deadline(self) -> float:
        return time.monotonic() + self.config.timeout_s

    def _current(self) -> int:
        with self._lock:
            return self._preferred

    def _failed(self, index: int) -> None:
        with self._lock:
            if self._preferred == index:
                self._preferred = (index + 1) % len(self._channels)

    def call(self, service: str, method: str, request: Any, *, idempotent: bool,
             deadline: float | None = None, stream: bool = False) -> Any:
        """One unary call, moving from member to member until the deadline.

        A non-idempotent call that may have reached a member raises MaybeApplied instead of
        being repeated. Raises Unavailable when no member answered in time (for a write:
        none was reached, so nothing was applied). stream=True calls a bidirectional
        method with the one request and returns its first response (lease keep-alive).
        """
        if self._closed:
            raise Unavailable("the etcd client is closed")
        deadline = deadline if deadline is not None else self.deadline()
        last: grpc.RpcError | None = None
        failures = 0
        while (remaining := deadline - time.monotonic()) > 0:
            index = self._current()
            rpc = getattr(self._stubs[index][service], method)
            timeout = min(remaining, self.config.attempt_timeout_s)
            try:
                with waits.io_wait():  # etcd's round trip: lend this thread's place
                    if stream:
                        responses = rpc(iter([request]), timeout=timeout)
                        try:
                            return next(responses)
                        finally:
                            responses.cancel()
                    return rpc(request, timeout=timeout)
            except StopIteration:
                raise Unavailable(f"etcd {method}: the stream ended without an answer") from None
            except grpc.RpcError as e:
                last = e
                if e.code() in _FINAL and not _not_sent(e):
                    raise final_error(e) from None
                self._failed(index)
                if not idempotent and not _not_sent(e):
                    raise MaybeApplied(self.config.endpoints[index], e) from None
                failures += 1
                if failures % len(self._channels) == 0:  # every member failed: breathe
                    time.sleep(min(0.05 * failures, 0.5, max(0.0, deadline - time.monotonic())))
        what = _describe(last) if last is not None else "no time left"
        raise Unavailable(f"etcd at {','.join(self.config.endpoints)} did not answer within "
                          f"{self.config.timeout_s:g}s ({what})")

    def stream(self, service: str, method: str, requests: Iterable[Any],
               timeout_s: float | None = None) -> tuple[str, Any]:
        """A streaming call on the preferred member: (endpoint, response iterator with
        .cancel()). Callers handle failures with rotate()."""
        if self._closed:
            raise Unavailable("the etcd client is closed")
        index = self._current()
        rpc = getattr(self._stubs[index][service], method)
        # hasleader: a member cut off from the quorum ends the stream ("no leader") rather
        # than keeping it open and silent, so the caller moves to another member
        return self.config.endpoints[index], rpc(iter(requests), timeout=timeout_s,
                                                 metadata=[("hasleader", "true")])

    def rotate(self, endpoint: str) -> None:
        """The member at `endpoint` failed a stream: prefer the next one."""
        self._failed(self.config.endpoints.index(endpoint))

    def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()


def open_requests(first: Any, stop: threading.Event) -> Iterator[Any]:
    """A request stream that sends `first` and then stays open until `stop` is set
    (gRPC half-closes a bidirectional stream when its request iterator ends)."""
    yield first
    stop.wait()
