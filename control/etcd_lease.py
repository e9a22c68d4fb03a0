"""etcd leases: grant with a TTL, keep alive from a background thread, revoke.

The local view is conservative: a lease counts as valid until (time the last successful
renewal was *sent*) + TTL, which is never later than etcd's own expiry. Code that acts
under a lease (a leader) checks alive() / remaining_s() before acting, and stops when
`lost` is set.
"""

from __future__ import annotations

import contextlib
import threading
import time

from control.etcd_client import EtcdClient
from engine.errors import NotFound, Unavailable
from proto.etcd import rpc_pb2


class Lease:
    def __init__(self, client: EtcdClient, lease_id: int, ttl_s: int, valid_from: float):
        self.client = client
        self.id = lease_id
        self.ttl_s = ttl_s
        self._valid_until = valid_from + ttl_s
        self.lost = threading.Event()  # expired, revoked, or no renewal got through in time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def grant(cls, client: EtcdClient, ttl_s: int) -> Lease:
        if ttl_s < 1:
            raise ValueError("lease TTL is at least 1 second")
        sent = time.monotonic()
        # a grant whose reply is lost leaves an unused lease that expires on its own
        rsp = client.call("Lease", "LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl_s),
                          idempotent=True)
        if rsp.error:
            raise Unavailable(f"etcd refused a lease: {rsp.error}")
        return cls(client, rsp.ID, rsp.TTL, sent)

    def remaining_s(self) -> float:
        """Seconds the lease is certainly still valid (0 when lost)."""
        if self.lost.is_set():
            return 0.0
        with self._lock:
            return max(0.0, self._valid_until - time.monotonic())

    def alive(self) -> bool:
        return self.remaining_s() > 0

    def keep_alive_once(self) -> None:
        """Renew now. Raises Unavailable if no member answered; sets `lost` (and raises
        NotFound) if etcd no longer has the lease."""
        sent = time.monotonic()
        deadline = min(sent + self.client.config.timeout_s,
                       max(sent + 0.1, self._valid_until))  # no point renewing a dead lease
        rsp = self.client.call("Lease", "LeaseKeepAlive",
                               rpc_pb2.LeaseKeepAliveRequest(ID=self.id),
                               idempotent=True, deadline=deadline, stream=True)
        if rsp.TTL <= 0:
            self.lost.set()
            raise NotFound(f"lease {self.id:x} has expired")
        with self._lock:
            self._valid_until = max(self._valid_until, sent + rsp.TTL)

    def start_keep_alive(self) -> None:
        """Renew every TTL/3 from a daemon thread until stopped, revoked or lost."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{self.id:x}",
                                            daemon=True)
            self._thread.start()

    def _keep_alive(self) -> None:
        period = max(self.ttl_s / 3, 0.2)
        while not self._stop.wait(period):
            try:
                self.keep_alive_once()
                period = max(self.ttl_s / 3, 0.2)
            except NotFound:
                return
            except Unavailable:
                if self.remaining_s() <= 0:
                    self.lost.set()
                    return
                period = 0.2  # try again soon, while the lease still holds

    def stop_keep_alive(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.client.config.timeout_s + 1)

    def time_to_live(self) -> int:
        """etcd's remaining TTL in seconds; -1 once the lease is gone."""
        rsp = self.client.call("Lease", "LeaseTimeToLive",
                               rpc_pb2.LeaseTimeToLiveRequest(ID=self.id), idempotent=True)
        return int(rsp.TTL)

    def revoke(self) -> None:
        """End the lease now: its keys are deleted. Revoking a gone lease is fine."""
        self.stop_keep_alive()
        with contextlib.suppress(NotFound):
            self.client.call("Lease", "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=self.id),
                             idempotent=True)
        self.lost.set()

    def __repr__(self) -> str:
        return f"Lease({self.id:x}, ttl={self.ttl_s}s, remaining={self.remaining_s():.1f}s)"
