"""The HA controller's decision (control/ha/decide.py) on objects built with the kubernetes
client's models: the issue's cases (node Ready but agent dead; node NotReady but frontend
alive; pods of other drivers; pods without an owner; volumes whose replicas are all in the dead
zone) and more (attachments of other drivers, pods already deleting, settling, idempotency)."""

from __future__ import annotations

import dataclasses
import datetime

from kubernetes import client as k

from control.ha.decide import (
    IGNORE_ANNOTATION,
    DeleteAttachment,
    DeletePod,
    Frontend,
    KubeView,
    LostFrontend,
    Replica,
    StoreView,
    decide,
)

DRIVER = "tandem.csi.dev"
NOW = 1_000_000.0
SETTLE = 5.0
T = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


# -- model builders -------------------------------------------------------------------------
def node(name: str, ready: bool = True, zone: str = "") -> k.V1Node:
    return k.V1Node(
        metadata=k.V1ObjectMeta(name=name, labels={"topology.kubernetes.io/zone": zone}),
        status=k.V1NodeStatus(conditions=[
            k.V1NodeCondition(type="Ready", status="True" if ready else "Unknown")]))


def pv(name: str, handle: str, driver: str = DRIVER) -> k.V1PersistentVolume:
    return k.V1PersistentVolume(
        metadata=k.V1ObjectMeta(name=name),
        spec=k.V1PersistentVolumeSpec(csi=k.V1CSIPersistentVolumeSource(
            driver=driver, volume_handle=handle)))


def pvc(name: str, volume_name: str, namespace: str = "app") -> k.V1PersistentVolumeClaim:
    return k.V1PersistentVolumeClaim(
        metadata=k.V1ObjectMeta(name=name, namespace=namespace),
        spec=k.V1PersistentVolumeClaimSpec(volume_name=volume_name))


def pod(name: str, node_name: str, claims: list[str], *, owner: str | None = "StatefulSet",
        namespace: str = "app", annotations: dict | None = None,
        deleting_grace: int | None = None, ephemeral: list[str] = ()) -> k.V1Pod:
    volumes = [k.V1Volume(name=f"v{i}", persistent_volume_claim=
                          k.V1PersistentVolumeClaimVolumeSource(claim_name=c))
               for i, c in enumerate(claims)]
    volumes += [k.V1Volume(name=e, ephemeral=k.V1EphemeralVolumeSource()) for e in ephemeral]
    owners = None if owner is None else [k.V1OwnerReference(
        api_version="apps/v1", kind=owner, name="web", uid="owner-uid", controller=True)]
    return k.V1Pod(
        metadata=k.V1ObjectMeta(
            name=name, namespace=namespace, uid=f"uid-{name}", owner_references=owners,
            annotations=annotations,
            deletion_timestamp=None if deleting_grace is None else T,
            deletion_grace_period_seconds=deleting_grace),
        spec=k.V1PodSpec(node_name=node_name, containers=[k.V1Container(name="c")],
                         volumes=volumes))


def va(name: str, pv_name: str, node_name: str, attacher: str = DRIVER,
       deleting: bool = False) -> k.V1VolumeAttachment:
    return k.V1VolumeAttachment(
        metadata=k.V1ObjectMeta(name=name, uid=f"uid-{name}",
                                deletion_timestamp=T if deleting else None),
        spec=k.V1VolumeAttachmentSpec(
            attacher=attacher, node_name=node_name,
            source=k.V1VolumeAttachmentSource(persistent_volume_name=pv_name)))


def lost(volume_id: str, node_id: str, ago_s: float = 60.0) -> LostFrontend:
    return LostFrontend(Frontend(volume_id, node_id, 7, "serving"), NOW - ago_s)


MIRRORED = (Replica("n-a", "zone-a"), Replica("n-b", "zone-b"), Replica("n-c", "zone-c"))


def cluster(**changes) -> tuple[StoreView, KubeView]:
    """Three zones, one node each; volume vol-1 (3 replicas) attached on n-a, used by pod
    web-0 (owned by a StatefulSet); n-a's frontend for vol-1 has lost its lease."""
    store = StoreView(lost=(lost("vol-1", "n-a"),), frontends={},
                      agents=frozenset({"n-b", "n-c"}), replicas={"vol-1": MIRRORED})
    kube = KubeView(
        nodes=[node("n-a", ready=False), node("n-b"), node("n-c")],
        pods=[pod("web-0", "n-a", ["data-web-0"])],
        claims=[pvc("data-web-0", "pv-1")],
        volumes=[pv("pv-1", "vol-1")],
        attachments=[va("csi-1", "pv-1", "n-a")],
    )
    store_changes = {k_: v for k_, v in changes.items() if k_ in StoreView.__dataclass_fields__}
    kube_changes = {k_: v for k_, v in changes.items() if k_ in KubeView.__dataclass_fields__}
    return dataclasses.replace(store, **store_changes), dataclasses.replace(kube, **kube_changes)


def run(store: StoreView, kube: KubeView, now: float = NOW):
    return decide(store, kube, now=now, settle_s=SETTLE, driver=DRIVER)


def deleted_pods(decision) -> list[str]:
    return [f"{a.namespace}/{a.name}" for a in decision.actions if isinstance(a, DeletePod)]


def deleted_attachments(decision) -> list[str]:
    return [a.name for a in decision.actions if isinstance(a, DeleteAttachment)]


def applied(kube: KubeView, decision) -> KubeView:
    """The Kubernetes objects after the actions: force-deleted pods are gone, deleted
    attachments carry a deletion timestamp (the attacher's finalizer holds them)."""
    gone = {a.uid for a in decision.actions if isinstance(a, DeletePod)}
    detached = {a.uid for a in decision.actions if isinstance(a, DeleteAttachment)}
    attachments = []
    for a in kube.attachments:
        if a.metadata.uid in detached:
            a = va(a.metadata.name, a.spec.source.persistent_volume_name, a.spec.node_name,
                   a.spec.attacher, deleting=True)
        attachments.append(a)
    return dataclasses.replace(kube, pods=[p for p in kube.pods if p.metadata.uid not in gone],
                               attachments=attachments)


# -- the basic failover ---------------------------------------------------------------------
def test_a_lost_frontend_moves_its_pod_then_detaches_its_volume():
    store, kube = cluster()
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"]
    assert deleted_attachments(d) == ["csi-1"]
    pod_action, va_action = d.actions
    assert pod_action.uid == "uid-web-0" and pod_action.node_id == "n-a"
    assert va_action.after_pods == ("uid-web-0",) and va_action.volume_id == "vol-1"
    assert "vol-1" not in d.finished  # to be checked once the deletions are seen


def test_repeated_decisions_are_idempotent():
    store, kube = cluster()
    first = run(store, kube)
    assert run(store, kube) == first  # same inputs, same answer
    after = applied(kube, first)
    second = run(store, after)
    assert second.actions == ()
    assert second.finished == ("vol-1",)  # nothing more to do: stop tracking it
    assert run(store, after) == second


# -- the cases ----------------------------------------------------------------------
def test_node_ready_but_agent_dead_is_left_alone():
    """The agent's registration is gone, its frontend still renews its lease: the data
    path works, nothing moves."""
    store, kube = cluster(lost=(), agents=frozenset({"n-b", "n-c"}),
                          frontends={"vol-1": Frontend("vol-1", "n-a", 7, "serving")},
                          nodes=[node("n-a"), node("n-b"), node("n-c")])
    d = run(store, kube)
    assert d.actions == () and d.notes == ()


def test_dead_agent_does_not_hold_back_a_lost_frontend():
    """Failover keys on the frontend's lease, not the agent's: agent alive or dead, a
    frontend that lost its lease on a Ready node is failed over."""
    for agents in (frozenset({"n-a", "n-b", "n-c"}), frozenset({"n-b", "n-c"})):
        store, kube = cluster(agents=agents, nodes=[node("n-a"), node("n-b"), node("n-c")])
        d = run(store, kube)
        assert deleted_pods(d) == ["app/web-0"] and deleted_attachments(d) == ["csi-1"]


def test_node_not_ready_but_frontend_alive_is_left_alone():
    store, kube = cluster(lost=(), frontends={"vol-1": Frontend("vol-1", "n-a", 7, "serving")})
    assert not node_is_ready(kube, "n-a")
    assert run(store, kube).actions == ()


def test_a_frontend_key_written_again_cancels_the_loss():
    """A restarted worker wrote the key again (or a clean stop said 'stopped'): the loss is
    forgotten without touching anything."""
    for state in ("serving", "stopped"):
        store, kube = cluster(frontends={"vol-1": Frontend("vol-1", "n-a", 8, state)})
        d = run(store, kube)
        assert d.actions == () and d.finished == ("vol-1",)


def test_pods_of_other_drivers_are_not_touched():
    store, kube = cluster()
    kube = dataclasses.replace(
        kube,
        pods=[*kube.pods, pod("db-0", "n-a", ["data-db-0"]), pod("cache-0", "n-a", [])],
        claims=[*kube.claims, pvc("data-db-0", "pv-ebs")],
        volumes=[*kube.volumes, pv("pv-ebs", "vol-ebs", driver="ebs.csi.aws.com")],
        attachments=[*kube.attachments, va("csi-ebs", "pv-ebs", "n-a",
                                           attacher="ebs.csi.aws.com")])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"]
    assert deleted_attachments(d) == ["csi-1"]


def test_a_volume_attachment_of_another_driver_is_kept_even_with_our_volume_id():
    """Only this driver's attachments count, whatever the PV's handle looks like."""
    store, kube = cluster()
    kube = dataclasses.replace(kube, attachments=[va("csi-x", "pv-1", "n-a",
                                                     attacher="other.csi.dev")])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"] and deleted_attachments(d) == []


def test_pods_without_an_owner_stay_and_keep_their_attachment():
    store, kube = cluster(pods=[pod("web-0", "n-a", ["data-web-0"], owner=None)])
    d = run(store, kube)
    assert d.actions == ()
    assert any("no owning controller" in n for n in d.notes)
    assert "vol-1" not in d.finished  # re-examined later (the node may come back)


def test_opted_out_pods_stay():
    store, kube = cluster(pods=[pod("web-0", "n-a", ["data-web-0"],
                                    annotations={IGNORE_ANNOTATION: "true"})])
    d = run(store, kube)
    assert d.actions == () and any(IGNORE_ANNOTATION in n for n in d.notes)


def test_a_volume_whose_replicas_are_all_in_the_dead_zone_stays():
    """Two replicas in zone-a (both nodes cut off: agents unregistered) and none alive
    elsewhere: moving the pod would strand it."""
    store, kube = cluster(
        replicas={"vol-1": (Replica("n-a", "zone-a"), Replica("n-a2", "zone-a"))},
        agents=frozenset({"n-b", "n-c"}),
        nodes=[node("n-a", ready=False), node("n-a2", ready=False), node("n-b"), node("n-c")])
    d = run(store, kube)
    assert d.actions == ()
    assert any("no usable replica" in n for n in d.notes)
    assert "vol-1" not in d.finished


def test_a_replica_counts_only_with_its_agent_registered_and_its_node_ready():
    only_b = {"vol-1": (Replica("n-a", "zone-a"), Replica("n-b", "zone-b"))}
    for agents, b_ready, moves in [({"n-b"}, True, True), (set(), True, False),
                                   ({"n-b"}, False, False)]:
        store, kube = cluster(replicas=only_b, agents=frozenset(agents),
                              nodes=[node("n-a", ready=False), node("n-b", ready=b_ready)])
        assert bool(run(store, kube).actions) is moves, (agents, b_ready)


def test_a_pod_already_force_deleted_needs_nothing_but_its_attachment_goes():
    store, kube = cluster(pods=[pod("web-0", "n-a", ["data-web-0"], deleting_grace=0)])
    d = run(store, kube)
    assert deleted_pods(d) == []
    assert deleted_attachments(d) == ["csi-1"]
    assert d.actions[0].after_pods == ()


def test_a_pod_stuck_in_graceful_deletion_on_the_dead_node_is_forced():
    store, kube = cluster(pods=[pod("web-0", "n-a", ["data-web-0"], deleting_grace=30)])
    assert deleted_pods(run(store, kube)) == ["app/web-0"]


def test_finished_pods_neither_move_nor_hold_attachments():
    """A completed Job's pod (no owner left, say) released its volume: the attachment goes,
    and the pod is not deleted."""
    done = pod("job-1", "n-a", ["data-web-0"], owner=None)
    done.status = k.V1PodStatus(phase="Succeeded")
    store, kube = cluster(pods=[done])
    d = run(store, kube)
    assert deleted_pods(d) == [] and deleted_attachments(d) == ["csi-1"]


def test_an_attachment_already_being_deleted_is_left_to_the_attacher():
    store, kube = cluster(attachments=[va("csi-1", "pv-1", "n-a", deleting=True)])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"] and deleted_attachments(d) == []


# -- timing ---------------------------------------------------------------------------------
def test_a_fresh_loss_waits_for_the_settle_time():
    store, kube = cluster(lost=(lost("vol-1", "n-a", ago_s=1.0),))
    d = run(store, kube)
    assert d.actions == () and abs(d.wait_s - (SETTLE - 1.0)) < 1e-9
    assert deleted_pods(run(store, kube, now=NOW + SETTLE)) == ["app/web-0"]


# -- what else a moving pod takes along, and what it leaves ---------------------------------
def test_a_moving_pods_other_volumes_are_detached_after_it():
    """web-0 also uses vol-2 (healthy, replicas in zones b and c): its attachment on the dead
    node goes too, or the new pod would wait for it; vol-3, used by a pod that stays, and
    vol-4, used by nobody that moves, stay attached."""
    store, kube = cluster(replicas={"vol-1": MIRRORED, "vol-2": MIRRORED, "vol-3": MIRRORED,
                                    "vol-4": MIRRORED})
    kube = dataclasses.replace(
        kube,
        pods=[pod("web-0", "n-a", ["data-web-0", "logs-web-0"]),
              pod("solo", "n-a", ["data-solo"], owner=None)],
        claims=[*kube.claims, pvc("logs-web-0", "pv-2"), pvc("data-solo", "pv-3"),
                pvc("idle", "pv-4")],
        volumes=[*kube.volumes, pv("pv-2", "vol-2"), pv("pv-3", "vol-3"), pv("pv-4", "vol-4")],
        attachments=[*kube.attachments, va("csi-2", "pv-2", "n-a"), va("csi-3", "pv-3", "n-a"),
                     va("csi-4", "pv-4", "n-a")])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"]
    assert sorted(deleted_attachments(d)) == ["csi-1", "csi-2"]
    assert all(a.after_pods == ("uid-web-0",) for a in d.actions
               if isinstance(a, DeleteAttachment))


def test_a_lost_volume_shared_with_a_pod_that_stays_keeps_its_attachment():
    store, kube = cluster()
    kube = dataclasses.replace(kube, pods=[pod("web-0", "n-a", ["data-web-0"]),
                                           pod("debug", "n-a", ["data-web-0"], owner=None)])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"] and deleted_attachments(d) == []
    assert any("a pod that stays" in n for n in d.notes)


def test_only_the_lost_node_is_touched():
    """The volume's new attachment on n-b (a failover already under way) and pods on
    other nodes are not the dead node's business."""
    store, kube = cluster()
    kube = dataclasses.replace(
        kube, pods=[*kube.pods, pod("web-1", "n-b", ["data-web-0"])],
        attachments=[*kube.attachments, va("csi-new", "pv-1", "n-b")])
    d = run(store, kube)
    assert deleted_pods(d) == ["app/web-0"] and deleted_attachments(d) == ["csi-1"]


def test_generic_ephemeral_volumes_count_as_the_pods_volumes():
    store, kube = cluster(pods=[pod("job-x", "n-a", [], owner="Job", ephemeral=["scratch"])],
                          claims=[pvc("job-x-scratch", "pv-1")])
    assert deleted_pods(run(store, kube)) == ["app/job-x"]


def test_a_lost_volume_without_kubernetes_objects_is_finished():
    store, kube = cluster(pods=[], claims=[], volumes=[], attachments=[])
    d = run(store, kube)
    assert d.actions == () and d.finished == ("vol-1",)


def test_no_volume_record_means_no_known_replica():
    store, kube = cluster(replicas={})
    assert run(store, kube).actions == ()


def node_is_ready(kube: KubeView, name: str) -> bool:
    from control.ha.decide import node_ready
    return node_ready(next(n for n in kube.nodes if n.metadata.name == name))
