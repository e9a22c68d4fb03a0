"""The HA controller's hands on the Kubernetes API, through the official client.

read() lists what a decision needs (nodes, the pods on the nodes concerned, claims,
volumes, attachments); apply() carries out the decision's actions in order:

- DeletePod: DELETE with grace 0 and a UID precondition, so a replacement pod of the same
  name (a StatefulSet's) is never touched;
- DeleteAttachment: DELETE with a UID precondition, only once every pod the decision
  deleted before it is gone (else its controller would only attach it again).

Idempotent: 404 (already gone) and 409 (the UID precondition failed: a new object holds
the name) count as done. 429, 5xx and connection errors are retried with backoff; other
errors (403: RBAC) are not. What still fails is left for the next round, which decides
again from fresh lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from control.ha.decide import Action, DeleteAttachment, DeletePod, KubeView

log = logging.getLogger(__name__)

DONE, GONE, REPLACED, FAILED, SKIPPED = "done", "gone", "replaced", "failed", "skipped"


@dataclass(frozen=True)
class Outcome:
    action: Action
    result: str  # done, gone, replaced, failed, skipped
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (DONE, GONE, REPLACED)


def _status(error: BaseException) -> int | None:
    """The HTTP status of a kubernetes client error (None: no answer at all)."""
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


def _retryable(error: BaseException) -> bool:
    status = _status(error)
    return status is None or status == 429 or status >= 500


class Kube:
    def __init__(self, core: Any, storage: Any, *, attempts: int = 5, backoff_s: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep, timeout_s: float = 10.0):
        self.core = core  # kubernetes.client.CoreV1Api
        self.storage = storage  # kubernetes.client.StorageV1Api
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, kubeconfig: str = "") -> Kube:
        from kubernetes import client, config
        if kubeconfig:
            config.load_kube_config(kubeconfig)
        else:
            config.load_incluster_config()
        return cls(client.CoreV1Api(), client.StorageV1Api())

    # -- reading -------------------------------------------------------------------------------
    def read(self, node_ids: Iterable[str]) -> KubeView:
        t = self.timeout_s
        pods: list[Any] = []
        for node_id in sorted(set(node_ids)):
            pods += self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node_id}", _request_timeout=t).items
        return KubeView(
            nodes=self.core.list_node(_request_timeout=t).items,
            pods=pods,
            claims=self.core.list_persistent_volume_claim_for_all_namespaces(
                _request_timeout=t).items,
            volumes=self.core.list_persistent_volume(_request_timeout=t).items,
            attachments=self.storage.list_volume_attachment(_request_timeout=t).items,
        )

    # -- acting --------------------------------------------------------------------------------
    def apply(self, actions: Sequence[Action]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        failed_pods: set[str] = set()
        for action in actions:
            if isinstance(action, DeleteAttachment) and failed_pods.intersection(action.after_pods):
                outcomes.append(Outcome(action, SKIPPED, "a pod using it was not deleted"))
                continue
            outcome = self._retrying(action)
            if not outcome.ok and isinstance(action, DeletePod):
                failed_pods.add(action.uid)
            level = logging.INFO if outcome.ok else logging.ERROR
            log.log(level, "%s: %s %s", _describe(action), outcome.result, outcome.detail)
            outcomes.append(outcome)
        return outcomes

    def _retrying(self, action: Action) -> Outcome:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                self._call(action)
                return Outcome(action, DONE)
            except Exception as e:  # the client raises ApiException, urllib3 errors, OSError
                status = _status(e)
                if status == 404:
                    return Outcome(action, GONE)
                if status == 409:
                    return Outcome(action, REPLACED, "another object holds the name now")
                if not _retryable(e) or attempt == self.attempts:
                    return Outcome(action, FAILED, f"{type(e).__name__}: {status or e}")
                self.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _call(self, action: Action) -> None:
        from kubernetes import client
        if isinstance(action, DeletePod):
            self.core.delete_namespaced_pod(
                action.name, action.namespace, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=action.uid)),
                _request_timeout=self.timeout_s)
        else:
            self.storage.delete_volume_attachment(
                action.name,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=action.uid)),
                _request_timeout=self.timeout_s)


def _describe(action: Action) -> str:
    if isinstance(action, DeletePod):
        return f"force-delete pod {action.namespace}/{action.name} on {action.node_id} " \
               f"({action.reason})"
    return f"delete VolumeAttachment {action.name} ({action.reason})"
