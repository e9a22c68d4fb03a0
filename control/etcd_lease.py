"""etcd leases: grant with a TTL, keep alive from a background thread, revoke.

The local view is conservative: a lease counts as valid until (time the last successful
renewal was *sent*) + TTL, which is never later than etcd's own expiry. Code that acts
under a lease (a leader) checks alive() / remaining_s() before acting, and stops when
`lost` is set.

Two ways a lease stops being certainly valid, told apart:
- `gone`: etcd said the lease does not exist any more (a keep-alive answered TTL 0 or
  NotFound; or we revoked it). Definitive: its keys are deleted.
- no renewal got through for a while (etcd unreachable, or without a leader): unknown.
  etcd expires leases only while it has a leader, and a newly elected leader gives every
  lease its full TTL again, so such a lease may well still exist. By default (what the
  controllers' leader election relies on) the lease is then `lost` for good and renewal
  stops. A *persistent* lease (opt-in) keeps trying: remaining_s() is 0 meanwhile and
  positive again as soon as etcd renews it; it is `lost` only once `gone`. Its renewals
  go every `renew_period_s` (at most 1 s) and each waits at most that long, so the time
  between the last renewal that got through and the first one that cannot is bounded
  (control/frontend_main.py builds on that bound).
"""

from __future__ import annotations

import contextlib
import threading
import time

from control.etcd_client import EtcdClient
from engine.errors import NotFound, Unavailable
from proto.etcd import rpc_pb2


class Lease:
    def __init__(self, client: EtcdClient, lease_id: int, ttl_s: int, valid_from: float,
                 *, persistent: bool = False):
        self.client = client
        self.id = lease_id
        self.ttl_s = ttl_s
        self.persistent = persistent
        # renewals: every third of the TTL; a persistent lease also at least every second,
        # each attempt waiting no longer than that
        self.renew_period_s = max(ttl_s / 3, 0.2)
        if persistent:
            self.renew_period_s = min(self.renew_period_s, 1.0)
        self._valid_until = valid_from + ttl_s
        # expired, revoked, or (unless persistent) no renewal got through in time
        self.lost = threading.Event()
        self.gone = threading.Event()  # etcd said it no longer has the lease (or revoked)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def grant(cls, client: EtcdClient, ttl_s: int, *, persistent: bool = False) -> Lease:
        if ttl_s < 1:
            raise ValueError("lease TTL is at least 1 second")
        sent = time.monotonic()
        # a grant whose reply is lost leaves an unused lease that expires on its own
        rsp = client.call("Lease", "LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl_s),
                          idempotent=True)
        if rsp.error:
            raise Unavailable(f"etcd refused a lease: {rsp.error}")
        return cls(client, rsp.ID, rsp.TTL, sent, persistent=persistent)

    def remaining_s(self) -> float:
        """Seconds the lease is certainly still valid (0 when lost)."""
        if self.lost.is_set():
            return 0.0
        with self._lock:
            return max(0.0, self._valid_until - time.monotonic())

    def alive(self) -> bool:
        return self.remaining_s() > 0

    def keep_alive_once(self) -> None:
        """Renew now. Raises Unavailable if no member answered; sets `gone` and `lost`
        (and raises NotFound) if etcd no longer has the lease."""
        sent = time.monotonic()
        if self.persistent:  # bounded, so a renewal gets through soon after etcd is back
            deadline = sent + min(self.client.config.timeout_s, self.renew_period_s)
        else:
            deadline = min(sent + self.client.config.timeout_s,
                           max(sent + 0.1, self._valid_until))  # no point renewing a dead lease
        try:
            rsp = self.client.call("Lease", "LeaseKeepAlive",
                                   rpc_pb2.LeaseKeepAliveRequest(ID=self.id),
                                   idempotent=True, deadline=deadline, stream=True)
        except NotFound:
            self._gone()
            raise
        if rsp.TTL <= 0:
            self._gone()
            raise NotFound(f"lease {self.id:x} has expired")
        with self._lock:
            self._valid_until = max(self._valid_until, sent + rsp.TTL)

    def _gone(self) -> None:
        self.gone.set()
        self.lost.set()

    def start_keep_alive(self) -> None:
        """Renew every renew_period_s from a daemon thread until stopped, revoked or lost."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{self.id:x}",
                                            daemon=True)
            self._thread.start()

    def _keep_alive(self) -> None:
        period = self.renew_period_s
        while not self._stop.wait(period):
            try:
                self.keep_alive_once()
                period = self.renew_period_s
            except NotFound:
                return
            except Unavailable:
                if self.remaining_s() <= 0 and not self.persistent:
                    self.lost.set()
                    return
                period = 0.2  # try again soon (a persistent lease: until etcd says gone)

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
        self._gone()

    def __repr__(self) -> str:
        return f"Lease({self.id:x}, ttl={self.ttl_s}s, remaining={self.remaining_s():.1f}s)"
