"""What the HA controller does about frontends that lost their etcd leases: a pure function.

    decide(StoreView, KubeView, now=..., settle_s=...) -> Decision(actions, notes, ...)

Inputs are what etcd shows (the frontends that vanished while serving, the frontends
serving now, the registered node agents, each volume's replicas) and Kubernetes objects
as the official client's models (V1Node, V1Pod, V1PersistentVolumeClaim,
V1PersistentVolume, V1VolumeAttachment). Output: DeletePod and DeleteAttachment actions,
pods first, and notes saying why anything was left alone. Nothing here talks to a server,
so the same inputs always give the same answer, and a decision re-run on the state its
actions produced asks for nothing more.

The trigger is the frontend's lease, never the node agent's: a frontend key
`frontend/<volume>` that disappears while it said "serving" means the data path on that
node died or was cut off from etcd (and fenced itself before the lease ran out, or, if it
still reaches its replicas, fences itself when the new ControllerPublish fences them:
docs/cluster-internals.md, "Self-fencing"). While etcd has no quorum no lease expires,
and a frontend serving on its replicas' word renews its lease when etcd is back. A dead
agent with live frontends is not a dead data path; a NotReady node whose frontends still
renew their leases is serving I/O; both are left alone.

For a lost frontend of volume V on node N, once the loss is `settle_s` old and no new
frontend key for V has appeared:
- every pod on N that uses V, has an owning controller, is not opted out
  (annotation `tandem.csi.dev/ha-ignore: "true"`), and whose Tandem volumes all still have
  a usable replica, is force-deleted (grace 0, UID precondition) so its controller
  recreates it elsewhere;
- Tandem's VolumeAttachments on N for V and for the other Tandem volumes of those pods
  are deleted (after the pods: deleting the attachment of a pod that stays would only
  have it attached again), unless a pod that stays on N still uses the volume;
- pods that finished (Succeeded, Failed) released their volumes: they are not counted;
- a replica is usable when its node's agent is registered in etcd and its Kubernetes
  Node is Ready. A volume with no usable replica (all of them in the dead zone) is left
  where it is: moving its pods would only strand them.

Timing, from the data path's death to the pods' deletion (defaults: frontend lease TTL
10 s as control/frontend_main.py grants it, settle 5 s):
    t0             the frontend's last lease renewal that reached etcd
    < t0 + TTL     the frontend fences itself (its margin before the lease can expire;
                   one still reaching its replicas does later, when they are fenced)
    t0 + TTL       etcd expires the lease (its lessor checks every 500 ms) and deletes
                   the key; the watch delivers the deletion within milliseconds
    + settle_s     the decision runs on fresh Kubernetes lists (four list calls)
    + ~0.1-1 s     one DELETE per pod, then one per VolumeAttachment
So lease expiry -> pod deletion takes settle_s plus about a second (5-6 s by default),
and the data path's death -> pod deletion at most TTL + 0.5 + settle_s + ~1 s (about
16.5 s by default). Kubernetes then recreates the pods, the external-attacher unpublishes
the deleted attachments, and the new ControllerPublish bumps the volume's generation,
fencing the old frontend on the replicas.

`settle_s` exists for two reasons: an agent that restarts a crashed frontend worker in
time writes the key again (the loss is forgotten), and the agents' registrations in a
zone cut off at the same moment may outlive the frontend's key by up to the difference
of the two lease TTLs: set settle_s at least to that difference so they are gone before
replicas are judged usable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from csi.config import DRIVER_NAME

SERVING, STOPPED = "serving", "stopped"
IGNORE_ANNOTATION = "tandem.csi.dev/ha-ignore"


# -- what etcd shows ----------------------------------------------------------------------
@dataclass(frozen=True)
class Frontend:
    """The value of `frontend/<volume_id>` (written by control/frontend_main.py)."""

    volume_id: str
    node_id: str
    generation: int
    state: str  # "serving" (under the frontend's lease) or "stopped" (a clean stop)

    @classmethod
    def from_value(cls, volume_id: str, value: Mapping[str, Any]) -> Frontend:
        return cls(volume_id, str(value.get("node_id", "")), int(value.get("generation", 0)),
                   str(value.get("state", "")))


@dataclass(frozen=True)
class LostFrontend:
    """A frontend whose key vanished (its lease expired) while it said "serving"."""

    frontend: Frontend
    lost_at: float  # wall-clock seconds, when the deletion was seen

    @property
    def volume_id(self) -> str:
        return self.frontend.volume_id

    @property
    def node_id(self) -> str:
        return self.frontend.node_id


@dataclass(frozen=True)
class Replica:
    node_id: str
    zone: str


def replicas_of(record: Mapping[str, Any]) -> tuple[Replica, ...]:
    """A `volume/<id>` record's replicas: its `replicas` list, or its one node when the
    list is absent (replicas 1)."""
    listed = record.get("replicas") or [{"node_id": record.get("node_id", ""),
                                         "zone": record.get("zone", "")}]
    return tuple(Replica(str(r.get("node_id", "")), str(r.get("zone", ""))) for r in listed
                 if r.get("node_id"))


@dataclass(frozen=True)
class StoreView:
    lost: tuple[LostFrontend, ...]
    frontends: Mapping[str, Frontend]  # the frontend keys present now, by volume
    agents: frozenset[str]  # node IDs whose agent is registered (`node/<id>` present)
    replicas: Mapping[str, tuple[Replica, ...]]  # by volume; absent: no record


# -- what Kubernetes shows ----------------------------------------------------------------
@dataclass(frozen=True)
class KubeView:
    nodes: Sequence[Any] = ()  # V1Node
    pods: Sequence[Any] = ()  # V1Pod (at least those on the nodes concerned)
    claims: Sequence[Any] = ()  # V1PersistentVolumeClaim
    volumes: Sequence[Any] = ()  # V1PersistentVolume
    attachments: Sequence[Any] = ()  # V1VolumeAttachment


# -- what to do ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeletePod:
    namespace: str
    name: str
    uid: str  # precondition: a replacement of the same name is never touched
    node_id: str
    reason: str


@dataclass(frozen=True)
class DeleteAttachment:
    name: str
    uid: str
    node_id: str
    volume_id: str
    after_pods: tuple[str, ...]  # UIDs of pods deleted in the same decision that used it
    reason: str


Action = DeletePod | DeleteAttachment


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()  # pods first, then attachments
    notes: tuple[str, ...] = ()  # what was left alone, and why
    finished: tuple[str, ...] = ()  # volumes whose loss needs nothing more: stop tracking
    wait_s: float = 0.0  # > 0: a loss still settling; decide again after this long


# -- helpers on the models ------------------------------------------------------------------
def node_ready(node: Any) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def force_deleted(pod: Any) -> bool:
    """Deleted with grace 0 already (it may linger for its finalizers): nothing to do."""
    meta = pod.metadata
    return meta.deletion_timestamp is not None and meta.deletion_grace_period_seconds == 0


def finished(pod: Any) -> bool:
    """Succeeded or Failed: its containers are gone and the kubelet released its volumes."""
    return pod.status is not None and pod.status.phase in ("Succeeded", "Failed")


def has_controller(pod: Any) -> bool:
    return any(ref.controller for ref in (pod.metadata.owner_references or []))


def opted_out(pod: Any) -> bool:
    return (pod.metadata.annotations or {}).get(IGNORE_ANNOTATION, "").lower() == "true"


def pod_claims(pod: Any) -> list[str]:
    """The PVC names a pod uses: its persistentVolumeClaim volumes and its generic
    ephemeral volumes (whose claim is named <pod>-<volume>)."""
    names = []
    for vol in (pod.spec.volumes if pod.spec else None) or []:
        if vol.persistent_volume_claim is not None:
            names.append(vol.persistent_volume_claim.claim_name)
        elif vol.ephemeral is not None:
            names.append(f"{pod.metadata.name}-{vol.name}")
    return names


@dataclass
class _Index:
    """Kubernetes objects indexed for the decision: Tandem's PVs and what uses them."""

    driver: str
    kube: KubeView
    handle_of_pv: dict[str, str] = field(default_factory=dict)  # PV name -> volume ID
    pv_of_claim: dict[tuple[str, str], str] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pv in self.kube.volumes:
            csi = pv.spec.csi if pv.spec else None
            if csi is not None and csi.driver == self.driver:
                self.handle_of_pv[pv.metadata.name] = csi.volume_handle
        for pvc in self.kube.claims:
            if pvc.spec and pvc.spec.volume_name in self.handle_of_pv:
                self.pv_of_claim[(pvc.metadata.namespace, pvc.metadata.name)] = \
                    pvc.spec.volume_name
        self.nodes = {n.metadata.name: n for n in self.kube.nodes}

    def pod_volumes(self, pod: Any) -> list[str]:
        """The Tandem volume IDs a pod uses."""
        out = []
        for claim in pod_claims(pod):
            pv = self.pv_of_claim.get((pod.metadata.namespace, claim))
            if pv is not None:
                out.append(self.handle_of_pv[pv])
        return out

    def pods_on(self, node_id: str) -> list[Any]:
        """The pods on the node that may hold volumes (not finished ones)."""
        return [p for p in self.kube.pods
                if p.spec and p.spec.node_name == node_id and not finished(p)]

    def attachments_on(self, node_id: str) -> list[tuple[Any, str]]:
        """(VolumeAttachment, volume ID) of this driver's attachments on the node."""
        out = []
        for va in self.kube.attachments:
            spec = va.spec
            if spec.attacher != self.driver or spec.node_name != node_id:
                continue
            handle = self.handle_of_pv.get(spec.source.persistent_volume_name or "")
            if handle is not None:
                out.append((va, handle))
        return out


# -- the decision ---------------------------------------------------------------------------
DEFAULT_SETTLE_S = 5.0  # tandem-ha --settle-seconds


def decide(store: StoreView, kube: KubeView, *, now: float, settle_s: float,
           driver: str = DRIVER_NAME) -> Decision:
    index = _Index(driver, kube)

    def usable(replica: Replica) -> bool:
        node = index.nodes.get(replica.node_id)
        return replica.node_id in store.agents and node is not None and node_ready(node)

    def survivors(volume_id: str) -> list[Replica]:
        return [r for r in store.replicas.get(volume_id, ()) if usable(r)]

    notes: list[str] = []
    finished: list[str] = []
    wait = 0.0
    by_node: dict[str, list[LostFrontend]] = {}
    for lost in store.lost:
        if lost.volume_id in store.frontends:  # a frontend came back, or stopped cleanly
            finished.append(lost.volume_id)
            continue
        if lost.lost_at + settle_s > now:
            left = lost.lost_at + settle_s - now
            wait = left if not wait else min(wait, left)
            continue
        by_node.setdefault(lost.node_id, []).append(lost)

    pod_actions: list[DeletePod] = []
    va_actions: list[DeleteAttachment] = []
    for node_id, losses in sorted(by_node.items()):
        lost_ids = {lost.volume_id for lost in losses}
        pods = index.pods_on(node_id)
        moving: dict[str, Any] = {}  # pod UID -> pod
        staying: list[Any] = []
        for pod in pods:
            volumes = index.pod_volumes(pod)
            if not lost_ids.intersection(volumes) or force_deleted(pod):
                if not force_deleted(pod):
                    staying.append(pod)
                continue
            why = _keep_reason(pod, volumes, survivors)
            if why:
                staying.append(pod)
                notes.append(f"pod {pod.metadata.namespace}/{pod.metadata.name} on {node_id} "
                             f"left in place: {why}")
                continue
            moving[pod.metadata.uid] = pod
            pod_actions.append(DeletePod(
                pod.metadata.namespace, pod.metadata.name, pod.metadata.uid, node_id,
                f"the frontend of {', '.join(sorted(lost_ids.intersection(volumes)))} on "
                f"{node_id} lost its etcd lease"))

        used_by_moving: dict[str, list[str]] = {}
        for uid, pod in moving.items():
            for vid in index.pod_volumes(pod):
                used_by_moving.setdefault(vid, []).append(uid)
        used_by_staying = {vid for pod in staying for vid in index.pod_volumes(pod)}
        pending: set[str] = set()  # lost volumes with something still to do on this node
        for va, vid in index.attachments_on(node_id):
            if vid not in lost_ids and vid not in used_by_moving:
                continue  # a healthy volume no moving pod uses: not ours to touch
            if va.metadata.deletion_timestamp is not None:
                continue  # already being detached
            if vid in used_by_staying:
                notes.append(f"VolumeAttachment {va.metadata.name} ({vid} on {node_id}) kept: "
                             "a pod that stays on the node uses it")
                pending.add(vid)
                continue
            if not survivors(vid):
                notes.append(f"VolumeAttachment {va.metadata.name} ({vid} on {node_id}) kept: "
                             "no usable replica elsewhere")
                pending.add(vid)
                continue
            va_actions.append(DeleteAttachment(
                va.metadata.name, va.metadata.uid, node_id, vid,
                tuple(sorted(used_by_moving.get(vid, ()))),
                f"{vid} failed over from {node_id}"))
            pending.add(vid)
        for vid in sorted(lost_ids):
            if vid in used_by_moving or vid in used_by_staying:
                pending.add(vid)
            if vid not in pending:
                finished.append(vid)

    return Decision(tuple(pod_actions) + tuple(va_actions), tuple(notes), tuple(finished), wait)


def _keep_reason(pod: Any, volumes: Iterable[str], survivors: Any) -> str:
    """Why a pod that uses a lost volume stays where it is ('' when it may move)."""
    if opted_out(pod):
        return f"annotated {IGNORE_ANNOTATION}"
    if not has_controller(pod):
        return "it has no owning controller to recreate it"
    stranded = sorted({v for v in volumes if not survivors(v)})
    if stranded:
        return (f"{', '.join(stranded)} has no usable replica elsewhere (every replica's "
                "node is down or its agent unregistered)")
    return ""
