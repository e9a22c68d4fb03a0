"""The HA controller's loop: the tracker on a real etcd (leases really expire), the applier's
retries and idempotency, and a whole round from an expired frontend lease to the deletions.

No Kubernetes API server can run here: `FakeApi` stands in for it with the few calls the
controller makes (lists with the field selector it uses; DELETE with grace and UID
preconditions, answering 404 and 409 as the API server does; attachments held by the
external-attacher's finalizer), returning the kubernetes client's own models and errors.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import uuid

import pytest
from kubernetes.client.exceptions import ApiException

from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore
from control.ha.decide import DeleteAttachment, DeletePod
from control.ha.kube import DONE, FAILED, GONE, REPLACED, SKIPPED, Kube
from control.ha.main import HaController
from control.ha.tracker import FRONTEND, FrontendTracker
from control.store import Delete, Put
from tests.unit.test_ha_decide import cluster, node, pod, pv, pvc, va


# -- a stand-in for the API server ------------------------------------------------------------
@dataclasses.dataclass
class _List:
    items: list


class FakeApi:
    """CoreV1Api and StorageV1Api in one: the calls control/ha/kube.py makes."""

    def __init__(self, kube_view, failures: dict | None = None):
        self.nodes = list(kube_view.nodes)
        self.pods = list(kube_view.pods)
        self.claims = list(kube_view.claims)
        self.volumes = list(kube_view.volumes)
        self.attachments = list(kube_view.attachments)
        self.failures = failures or {}  # name -> list of statuses to raise, in turn
        self.calls: list[tuple] = []
        self.deleted_at: dict[str, float] = {}

    def _fail(self, name):
        queue = self.failures.get(name)
        if queue:
            raise ApiException(status=queue.pop(0))

    def list_node(self, **_):
        return _List(self.nodes)

    def list_pod_for_all_namespaces(self, field_selector="", **_):
        key, _, value = field_selector.partition("=")
        assert key == "spec.nodeName"
        return _List([p for p in self.pods if p.spec.node_name == value])

    def list_persistent_volume_claim_for_all_namespaces(self, **_):
        return _List(self.claims)

    def list_persistent_volume(self, **_):
        return _List(self.volumes)

    def list_volume_attachment(self, **_):
        return _List(self.attachments)

    def delete_namespaced_pod(self, name, namespace, grace_period_seconds=None, body=None, **_):
        self.calls.append(("pod", namespace, name, grace_period_seconds, body.grace_period_seconds,
                           body.preconditions.uid))
        self._fail(name)
        found = [p for p in self.pods if p.metadata.name == name
                 and p.metadata.namespace == namespace]
        if not found:
            raise ApiException(status=404)
        if found[0].metadata.uid != body.preconditions.uid:
            raise ApiException(status=409)
        self.pods.remove(found[0])  # grace 0: gone at once
        self.deleted_at[name] = time.monotonic()

    def delete_volume_attachment(self, name, body=None, **_):
        self.calls.append(("va", name, body.preconditions.uid))
        self._fail(name)
        found = [a for a in self.attachments if a.metadata.name == name]
        if not found:
            raise ApiException(status=404)
        if found[0].metadata.uid != body.preconditions.uid:
            raise ApiException(status=409)
        found[0].metadata.deletion_timestamp = datetime.datetime.now(datetime.UTC)
        self.deleted_at[name] = time.monotonic()


def kube_for(api: FakeApi) -> Kube:
    return Kube(api, api, attempts=3, backoff_s=0.0, sleep=lambda s: None)


POD = DeletePod("app", "web-0", "uid-web-0", "n-a", "test")
VA = DeleteAttachment("csi-1", "uid-csi-1", "n-a", "vol-1", ("uid-web-0",), "test")


# -- the applier ---------------------------------------------------------------------------------
def test_apply_deletes_pods_with_grace_zero_and_uid_preconditions():
    api = FakeApi(cluster()[1])
    outcomes = kube_for(api).apply([POD, VA])
    assert [o.result for o in outcomes] == [DONE, DONE]
    assert api.calls == [("pod", "app", "web-0", 0, 0, "uid-web-0"), ("va", "csi-1", "uid-csi-1")]


def test_apply_is_idempotent_and_never_touches_a_replacement():
    api = FakeApi(cluster()[1])
    kube = kube_for(api)
    kube.apply([POD, VA])
    assert [o.result for o in kube.apply([POD])] == [GONE]
    api.pods.append(pod("web-0", "n-b", ["data-web-0"]))  # the StatefulSet's new pod...
    api.pods[-1].metadata.uid = "uid-web-0-new"
    assert [o.result for o in kube.apply([POD])] == [REPLACED]  # ...is left alone
    assert [p.metadata.uid for p in api.pods] == ["uid-web-0-new"]


def test_apply_retries_server_errors_but_not_refusals():
    api = FakeApi(cluster()[1], failures={"web-0": [500, 429], "csi-1": [403]})
    outcomes = kube_for(api).apply([POD, VA])
    assert [o.result for o in outcomes] == [DONE, FAILED]
    assert len([c for c in api.calls if c[0] == "pod"]) == 3  # 500, 429, then done
    assert len([c for c in api.calls if c[0] == "va"]) == 1  # 403: RBAC, no retry


def test_an_attachment_waits_for_its_pods():
    api = FakeApi(cluster()[1], failures={"web-0": [503, 503, 503]})
    outcomes = kube_for(api).apply([POD, VA])
    assert [o.result for o in outcomes] == [FAILED, SKIPPED]
    assert not [c for c in api.calls if c[0] == "va"]


# -- the tracker and a whole round on a real etcd --------------------------------------------
@pytest.fixture
def store(etcd1):
    s = EtcdStore(EtcdConfig.from_url(etcd1.url, namespace=f"/ha-{uuid.uuid4().hex[:8]}/"))
    try:
        yield s
    finally:
        s.close()


def serving(node_id: str = "n-a", generation: int = 7) -> dict:
    return {"node_id": node_id, "generation": generation, "state": "serving",
            "since": time.time()}


def wait_for(pred, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_tracker_tells_an_expired_lease_from_a_clean_stop(store):
    tracker = FrontendTracker(store).start()
    try:
        wait_for(tracker.synced.is_set)
        lease = store.grant_lease(10, keep_alive=False)
        store.commit([Put(FRONTEND + "vol-1", serving(), lease=lease.id),
                      Put(FRONTEND + "vol-2", serving("n-b"))])
        wait_for(lambda: len(tracker.view()[1]) == 2)
        # vol-2 stops cleanly: "stopped" first, then its key goes
        store.commit([Put(FRONTEND + "vol-2", {**serving("n-b"), "state": "stopped"})])
        store.commit([Delete(FRONTEND + "vol-2")])
        lease.revoke()  # etcd deletes the key as it does when the lease expires (see below)
        lost = wait_for(lambda: tracker.view()[0])
        assert [(x.volume_id, x.node_id, x.frontend.generation) for x in lost] == \
            [("vol-1", "n-a", 7)]
        # a new lease and key (a restarted worker) cancels the loss
        store.commit([Put(FRONTEND + "vol-1", serving(generation=8))])
        wait_for(lambda: not tracker.view()[0])
    finally:
        tracker.stop()


def test_tracker_finds_losses_made_while_it_was_not_watching(store):
    tracker = FrontendTracker(store)
    store.commit([Put(FRONTEND + "vol-1", serving()),
                  Put(FRONTEND + "vol-2", {**serving(), "state": "stopped"})])
    tracker.sync()
    store.commit([Delete(FRONTEND + "vol-1"), Delete(FRONTEND + "vol-2")])
    tracker.sync()  # what the tracker does after a broken or compacted watch
    assert [x.volume_id for x in tracker.view()[0]] == ["vol-1"]


def test_an_expired_frontend_lease_moves_the_pod_and_detaches_the_volume(store):
    """From etcd to the API calls: agents of n-b and n-c registered, vol-1 mirrored on
    n-a, n-b, n-c; the frontend on n-a stops renewing. Prints the time from the lease's
    expiry to the pod's and the attachment's deletion (settle 0 here)."""
    _, view = cluster()
    api = FakeApi(view)
    store.commit([Put("node/n-b", {"zone": "zone-b", "address": "198.18.0.2:9600"}),
                  Put("node/n-c", {"zone": "zone-c", "address": "198.18.0.3:9600"}),
                  Put("volume/vol-1", {"volume_id": "vol-1", "name": "pvc-1", "state": "ready",
                                       "node_id": "n-a", "zone": "zone-a",
                                       "capacity_bytes": 1 << 30,
                                       "replicas": [{"node_id": n, "zone": f"zone-{n[-1]}"}
                                                    for n in ("n-a", "n-b", "n-c")]})])
    tracker = FrontendTracker(store).start()
    controller = HaController(store, tracker, kube_for(api), settle_s=0.0, resync_s=30.0)
    stop = threading.Event()
    loop = threading.Thread(target=controller.serve, args=(lambda: True, stop), daemon=True)
    try:
        wait_for(tracker.synced.is_set)
        ttl = 2
        lease = store.grant_lease(ttl, keep_alive=False)
        granted = time.monotonic()
        store.commit([Put(FRONTEND + "vol-1", serving(), lease=lease.id)])
        loop.start()
        wait_for(lambda: "csi-1" in api.deleted_at, timeout_s=ttl + 8)
        expiry = granted + ttl
        print(f"\nlease expiry -> pod deleted {api.deleted_at['web-0'] - expiry:.2f} s, "
              f"-> attachment deleted {api.deleted_at['csi-1'] - expiry:.2f} s")
        assert api.deleted_at["web-0"] <= api.deleted_at["csi-1"]
        assert api.calls == [("pod", "app", "web-0", 0, 0, "uid-web-0"),
                             ("va", "csi-1", "uid-csi-1")]
        wait_for(lambda: not tracker.view()[0])  # finished: no longer tracked
    finally:
        stop.set()
        loop.join(timeout=5)
        tracker.stop()


def test_a_dead_agent_alone_moves_nothing(store):
    """n-a's agent registration goes, its frontend keeps serving: no round acts."""
    _, view = cluster()
    api = FakeApi(dataclasses.replace(view, nodes=[node("n-a"), node("n-b"), node("n-c")],
                                      claims=[pvc("data-web-0", "pv-1")],
                                      volumes=[pv("pv-1", "vol-1")],
                                      attachments=[va("csi-1", "pv-1", "n-a")]))
    agent = store.grant_lease(10, keep_alive=False)
    store.commit([Put("node/n-a", {"zone": "zone-a"}, lease=agent.id),
                  Put(FRONTEND + "vol-1", serving())])
    tracker = FrontendTracker(store)
    tracker.sync()
    controller = HaController(store, tracker, kube_for(api), settle_s=0.0)
    agent.revoke()
    assert store.get("node/n-a") is None
    tracker.sync()
    controller.round()
    assert api.calls == [] and tracker.view()[0] == ()


class _Recorder:
    """Stands in for HaController in lead(): records who serves, until told to stop."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def serve(self, may_act, stop):
        self.log.append(("start", self.name))
        while may_act() and not stop.is_set():
            time.sleep(0.02)
        self.log.append(("end", self.name))


def test_one_replica_acts_and_the_other_takes_over_when_it_stops(store):
    from control.ha.main import lead
    log: list = []
    stops = {n: threading.Event() for n in ("ha-0", "ha-1")}
    threads = {n: threading.Thread(target=lead, args=(store, _Recorder(n, log), n, 2, stops[n]),
                                   daemon=True) for n in stops}
    try:
        threads["ha-0"].start()
        wait_for(lambda: ("start", "ha-0") in log)
        threads["ha-1"].start()
        time.sleep(0.5)
        assert log == [("start", "ha-0")]  # the second replica waits
        stops["ha-0"].set()  # the leader stops: it resigns, the other leads at once
        threads["ha-0"].join(timeout=5)
        wait_for(lambda: ("start", "ha-1") in log, timeout_s=5)
        assert log[:2] == [("start", "ha-0"), ("end", "ha-0")]
    finally:
        for n in stops:
            stops[n].set()
        for t in threads.values():
            if t.is_alive():
                t.join(timeout=5)
