"""`tandem-ha`: the HA controller process.

Every replica follows the frontends in etcd (control/ha/tracker.py) from its start, so a standby
that takes over knows every loss seen since it started; only the leader, elected on etcd
(control/election.py), decides and acts. A round: read the losses, the registered agents
(`node/`) and the lost volumes' records (`volume/<id>`) from etcd, list the Kubernetes
objects, decide (control/ha/decide.py, pure), apply (control/ha/kube.py), and decide
again until nothing is left to do (at most a few times; a blocked volume is looked at
again every resync).
See control/ha/decide.py for what is done and how long failover takes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from control.ha.decide import DEFAULT_SETTLE_S, Decision, StoreView, decide, replicas_of
from control.ha.kube import Kube
from control.ha.tracker import FrontendTracker
from control.records import VOLUME
from control.store import Store
from csi.config import DRIVER_NAME
from engine.errors import EngineError

log = logging.getLogger("tandem.ha")

NODE = "node/"  # node agents' registrations (under their leases): present = agent alive
ROUNDS = 3  # decide/apply passes per trigger: pods, then their attachments, then a check


class HaController:
    def __init__(self, store: Store, tracker: FrontendTracker, kube: Kube, *,
                 settle_s: float = 5.0, resync_s: float = 30.0, driver: str = DRIVER_NAME,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.tracker = tracker
        self.kube = kube
        self.settle_s = settle_s
        self.resync_s = resync_s
        self.driver = driver
        self.clock = clock
        self._notes: tuple[str, ...] = ()
        self.last: Decision | None = None

    def store_view(self) -> StoreView | None:
        lost, current = self.tracker.view()
        if not lost:
            return None
        agents = frozenset(key[len(NODE):] for key, _ in self.store.list(NODE))
        replicas = {}
        for loss in lost:
            got = self.store.get(VOLUME + loss.volume_id)
            if got is not None:
                replicas[loss.volume_id] = replicas_of(got.value)
        return StoreView(lost, current, agents, replicas)

    def round(self, may_act: Callable[[], bool] = lambda: True) -> float:
        """Decide and act on the losses known now; returns seconds until the next round."""
        view = self.store_view()
        if view is None:
            return self.resync_s
        decision = Decision()
        for _ in range(ROUNDS):
            kube_view = self.kube.read({loss.node_id for loss in view.lost})
            decision = decide(view, kube_view, now=self.clock(), settle_s=self.settle_s,
                              driver=self.driver)
            self.last = decision
            if decision.notes != self._notes:
                for note in decision.notes:
                    log.warning("%s", note)
                self._notes = decision.notes
            self.tracker.forget(decision.finished)
            if not decision.actions or not may_act():
                break
            if not all(o.ok for o in self.kube.apply(decision.actions)):
                break
        return min(decision.wait_s or self.resync_s, self.resync_s)

    def serve(self, may_act: Callable[[], bool], stop: threading.Event) -> None:
        """Rounds while may_act() (the leadership holds) until stop: at once on every loss
        or return the tracker sees, else when a loss has settled or every resync_s."""
        while not stop.is_set() and may_act():
            self.tracker.changed.clear()
            try:
                wait = self.round(may_act)
            except Exception:  # the API server or etcd failed mid-round: try again soon
                log.exception("HA round failed")
                wait = min(self.resync_s, 5.0)
            deadline = time.monotonic() + wait
            while not stop.is_set() and may_act() and not self.tracker.changed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.tracker.changed.wait(min(remaining, 1.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem-ha", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="etcd://HOST:PORT,... or etcds://HOST:PORT,...")
    p.add_argument("--store-ca", default="")
    p.add_argument("--store-cert", default="")
    p.add_argument("--store-key", default="")
    p.add_argument("--store-namespace", default="/tandem/")
    p.add_argument("--store-timeout", type=float, default=5.0)
    p.add_argument("--driver-name", default=DRIVER_NAME)
    p.add_argument("--settle-seconds", type=float, default=DEFAULT_SETTLE_S,
                   help="how long a lost frontend stays lost before pods move (>= the agents' "
                        "lease TTL minus the frontends')")
    p.add_argument("--resync-seconds", type=float, default=30.0)
    p.add_argument("--leader-lease-seconds", type=int, default=10)
    p.add_argument("--id", default=socket.gethostname(), help="this replica's name")
    p.add_argument("--kubeconfig", default="", help="default: the pod's service account")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if not a.store.startswith(("etcd://", "etcds://")):
        p.error("--store must be etcd:// or etcds:// (the frontends' leases live in etcd)")
    if a.settle_seconds < 0 or a.resync_seconds <= 0 or a.leader_lease_seconds < 2:
        p.error("--settle-seconds >= 0, --resync-seconds > 0, --leader-lease-seconds >= 2")
    return a


def lead(store, controller: HaController, identity: str, ttl_s: int,  # type: ignore[no-untyped-def]
         stop: threading.Event) -> None:
    """Campaign, serve while leader, again after losing it, until stop."""
    from control.election import Election
    election = Election(store, "ha-controller")
    while not stop.is_set():
        try:
            lease = store.grant_lease(ttl_s)
            leadership = election.campaign(identity, lease, timeout_s=ttl_s)
        except EngineError as e:  # Busy (another replica leads), Unavailable, NotLeader
            log.debug("not leading: %s", e)
            stop.wait(1.0)
            continue
        log.info("%s leads the HA controller", identity)
        try:
            controller.serve(leadership.alive, stop)
        finally:
            try:
                leadership.resign()
                lease.revoke()
            except EngineError:
                pass
        log.info("%s no longer leads", identity)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see csi/server.py's main
    from control.stores import StoreSpec, open_store
    store = open_store(StoreSpec(a.store, a.store_ca, a.store_cert, a.store_key,
                                 a.store_timeout, a.store_namespace))
    tracker = FrontendTracker(store).start()
    controller = HaController(store, tracker, Kube.connect(a.kubeconfig),
                              settle_s=a.settle_seconds, resync_s=a.resync_seconds,
                              driver=a.driver_name)
    stop = threading.Event()
    leader = threading.Thread(target=lead, args=(store, controller, a.id,
                                                 a.leader_lease_seconds, stop), daemon=True)
    leader.start()
    sig = signal.sigwait(STOP_SIGNALS)
    log.info("stopping on %s", signal.Signals(sig).name)
    stop.set()
    leader.join(timeout=a.leader_lease_seconds + 5)
    tracker.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
