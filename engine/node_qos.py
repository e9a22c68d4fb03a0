"""Per-volume QoS on this node: the tier each volume has, and its enforcement on the pods
that use it (engine/qos/). Glue between the volume life cycle and the QoS engine.

Each volume's spec is kept in its backing record (engine/volumes.py), so a publish, a
restart or a tier change finds it, at no extra commit on CreateVolume. Enforcement is
best effort on purpose: when the node has no usable cgroup I/O controller, or a pod has
no cgroup yet, the volume is still published (a pod without its volume is worse than one
without its limit) and a warning says why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.errors import EngineError, NotFound, Unavailable
from engine.node_records import Device, NodeRecords
from engine.qos.squeeze import SqueezeLoop
from engine.qos.throttle import QosBinding, QosEnforcer
from engine.qos.tiers import QosSpec
from engine.state import Store

if TYPE_CHECKING:
    from engine.backend import Backend

log = logging.getLogger(__name__)


class NodeQos:
    def __init__(self, store: Store, cgroup_root: str = "/sys/fs/cgroup", *,
                 cgroup_parent: str = "", enabled: bool = True):
        self.records = NodeRecords(store)
        self.cgroup_root = cgroup_root
        self.cgroup_parent = cgroup_parent
        self.enabled = enabled
        self.enforcer: QosEnforcer | None = None
        self.squeeze: SqueezeLoop | None = None
        self.unavailable_reason = "disabled by configuration" if not enabled else ""
        self.files: Backend | None = None

    def attach(self, files: Backend) -> None:
        """Where the volumes' specs are kept."""
        self.files = files

    def open(self) -> None:
        """Find the I/O controller, re-apply every recorded binding, start the squeeze loop."""
        if not self.enabled:
            return
        try:
            self.enforcer = QosEnforcer(self.cgroup_root, kubelet_parent=self.cgroup_parent)
        except Unavailable as e:
            self.unavailable_reason = str(e)
            log.warning("QoS limits cannot be enforced on this node: %s", e)
            return
        failed = self.enforcer.restore(self.bindings())
        for binding, why in failed:
            log.warning("QoS of %s on pod %s not restored: %s", binding.volume_id,
                        binding.pod_uid, why)
        self.squeeze = SqueezeLoop(self.enforcer)

    def close(self) -> None:
        # the kernel keeps the rules: pods stay limited while the driver restarts
        if self.squeeze is not None:
            self.squeeze.close()
        if self.enforcer is not None:
            self.enforcer.close()

    # --- specs ---------------------------------------------------------------------------
    def spec(self, volume_id: str) -> QosSpec:
        backing = self.files.get(volume_id) if self.files else None
        return QosSpec.from_json(backing.qos_json) if backing else QosSpec()

    def set_spec(self, volume_id: str, spec: QosSpec, version: int = 0) -> None:
        """Record the volume's tier and apply it to the pods using it now (no remount)."""
        assert self.files is not None, "attach() first"
        self.files.set_qos(volume_id, spec.to_json(), version)
        if self.enforcer is not None:
            self.enforcer.update(volume_id, spec)

    def enforce(self, volume_id: str, spec: QosSpec) -> None:
        """Apply a spec recorded elsewhere (a mirrored volume's frontend) to the pods using
        the volume now."""
        if self.enforcer is not None:
            self.enforcer.update(volume_id, spec)

    # --- publish / unpublish ---------------------------------------------------------------
    def published(self, volume_id: str, pod_uid: str, device: Device) -> None:
        spec = self.spec(volume_id)
        if not pod_uid or self.enforcer is None:
            if pod_uid and spec.limited:
                log.warning("volume %s: tier %s not enforced: %s", volume_id,
                            spec.name or "(custom)", self.unavailable_reason)
            return
        try:
            self.enforcer.apply(volume_id, pod_uid, device, spec)
        except NotFound as e:
            log.warning("volume %s: tier not enforced on pod %s yet: %s", volume_id, pod_uid, e)
        except EngineError as e:
            log.warning("volume %s: tier not enforced on pod %s: %s", volume_id, pod_uid, e)

    def unpublished(self, volume_id: str, pod_uid: str, device: Device | None) -> None:
        if pod_uid and self.enforcer is not None:
            self.enforcer.remove(volume_id, pod_uid, device)

    def bindings(self) -> list[QosBinding]:
        """The rules each finished publish to a known pod calls for."""
        return [QosBinding(p.volume_id, p.pod_uid, p.device, self.spec(p.volume_id))
                for p in self.records.list_publishes()
                if p.done and p.pod_uid and p.device is not None]
