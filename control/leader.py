"""The background work only one controller does at a time: the leader's.

Every controller serves CSI calls; their writes are compare-and-set on the records, so two
controllers racing on one name or ID make one outcome (control/volumes.py). What must not
run twice at once is the background: the reconciler (intent expiry, tombstone
convergence, orphan reports). Controllers campaign in an etcd election
(control/election.py); the winner runs the reconciler on its fenced store, so if it is
deposed mid-round (its lease lost, paused past its TTL, cut off) its commits are refused
(NotLeader) instead of undoing a newer leader's decisions. When the lease is lost the
round stops and the controller campaigns again.

The leader also publishes the orphan report (storage no record names, per node) at
`report/orphans` in the cluster store, for operators and tests.
"""

from __future__ import annotations

import logging
import threading
import time

from control.election import Election, Leadership
from control.etcd_lease import Lease
from control.etcd_store import EtcdStore
from control.plane import ControlPlane
from control.reconcile import Orphans, Reconciler
from control.store import Put, Store
from engine.errors import EngineError

log = logging.getLogger(__name__)

ELECTION = "controller"
ORPHAN_REPORT = "report/orphans"
DEFAULT_TTL_S = 10


def write_orphan_report(store: Store, orphans: Orphans, now: float) -> None:
    store.commit([Put(ORPHAN_REPORT, {"at": now, "volumes": orphans.volumes,
                                      "snapshots": orphans.snapshots})])


class LeaderDuties:
    def __init__(self, store: EtcdStore, plane: ControlPlane, identity: str,
                 interval_s: float, *, ttl_s: int = DEFAULT_TTL_S):
        self.store = store
        self.plane = plane
        self.identity = identity  # what the election shows for this controller
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.election = Election(store, ELECTION)
        self.leading = threading.Event()  # set while this controller leads
        self.rounds = 0  # completed reconcile rounds while leading (tests, logs)
        self._leadership: Leadership | None = None
        self._lease: Lease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._term()
            except EngineError as e:  # etcd away, lease lost while campaigning
                log.info("leader election: %s; campaigning again", e)
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - never stop campaigning on a bug's account
                log.exception("leader duties failed; campaigning again")
                self._stop.wait(1.0)

    def _term(self) -> None:
        """Campaign, lead until the lease is lost (or stop), then step down."""
        lease = self._lease = self.store.grant_lease(self.ttl_s)
        try:
            if self._stop.is_set():
                return
            # returns once every older candidate is gone; NotLeader when the lease is
            # lost meanwhile (etcd away, or stop())
            leadership = self.election.campaign(self.identity, lease)
            self._leadership = leadership
            self.leading.set()
            log.info("%s leads the controllers (reconciling every %gs)", self.identity,
                     self.interval_s)
            fenced = leadership.fenced(self.store)
            reconciler = self.plane.reconciler_on(fenced)
            reconciler.report = lambda orphans: write_orphan_report(fenced, orphans,
                                                                    time.time())
            self._lead(reconciler, leadership)
        finally:
            self.leading.clear()
            leadership_, self._leadership = self._leadership, None
            if leadership_ is not None:
                try:
                    leadership_.resign()
                except EngineError as e:
                    log.info("resigning: %s (the lease expires by itself)", e)
            try:
                lease.revoke()
            except EngineError:
                lease.stop_keep_alive()

    def _lead(self, reconciler: Reconciler, leadership: Leadership) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set() and leadership.alive():
            if time.monotonic() >= next_round:
                try:
                    reconciler.run_once()
                    self.rounds += 1
                except EngineError as e:
                    log.info("reconcile round cut short: %s", e)
                except Exception:  # noqa: BLE001 - the next round retries
                    log.exception("reconcile round failed")
                # interval 0: one round per term (as all-in-one's "only at start-up")
                next_round = time.monotonic() + (self.interval_s if self.interval_s > 0
                                                 else float("inf"))
            if leadership.lease.lost.wait(min(0.5, max(0.0, next_round - time.monotonic()))):
                break
        if not self._stop.is_set():
            log.warning("%s lost the leadership (lease not renewed in time)", self.identity)

    def stop(self) -> None:
        """Step down (the next candidate takes over at once) and stop campaigning."""
        self._stop.set()
        lease = self._lease
        if lease is not None:
            lease.lost.set()  # ends a campaign or a term at once; revoked on the way out
        if self._thread is not None:
            self._thread.join(timeout=15)
