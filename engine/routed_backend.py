"""The node's backend together with the frontends of mirrored volumes staged here.

A mirrored volume staged on this node gets its block device from its frontend (a FUSE file
behind a loop device, reaching every replica), not from the node's pool: the stage, publish
and their records are the same as for any volume. NodeVolumes asks this object for a volume
and its devices; a volume with a frontend record is the frontends' (records of role
FRONTEND), anything else the pool's. The frontends' side is injected (the node agent's
control/frontend_backend.py): the engine knows only the shape below.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from engine.backend import Backend, Device, DeviceView
from engine.errors import NotFound
from engine.volumes import Backing

if TYPE_CHECKING:
    from engine.mounts import MountEntry
    from engine.node_records import NodeRecords

FRONTEND = "frontend"  # Backing.role of a mirrored volume staged here


class FrontendVolumes(Protocol):
    """What NodeVolumes asks of a mirrored volume staged on this node."""

    def get(self, volume_id: str) -> Backing | None: ...
    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing: ...
    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None: ...
    def devices(self, backing: Backing) -> list[Device]: ...
    def attach(self, backing: Backing, *, read_only: bool = False) -> Device: ...
    def release(self, backing: Backing, dev: Device, *,
                require_released: bool = False) -> None: ...
    def still_holds(self, backing: Backing, dev: Device) -> bool: ...
    def holds_data(self, backing: Backing, dev: Device) -> bool: ...
    def storage_missing(self, backing: Backing) -> str: ...
    def refreshed(self, backing: Backing, dev: Device) -> Device: ...


class _View:
    def __init__(self, local: DeviceView, frontends: FrontendVolumes):
        self.local, self.frontends = local, frontends

    def devices_of(self, backing: Backing) -> list[Device]:
        if backing.role == FRONTEND:
            return self.frontends.devices(backing)
        return self.local.devices_of(backing)


class RoutedBackend:
    def __init__(self, local: Backend, frontends: FrontendVolumes):
        self.local = local
        self.frontends = frontends

    def _of(self, backing: Backing) -> Any:
        return self.frontends if backing.role == FRONTEND else self.local

    # --- records -----------------------------------------------------------------------
    def get(self, volume_id: str) -> Backing | None:
        return self.frontends.get(volume_id) or self.local.get(volume_id)

    def require(self, volume_id: str) -> Backing:
        backing = self.get(volume_id)
        if backing is None:
            raise NotFound(f"volume {volume_id} is not on this node")
        return backing

    def set_made_fs(self, volume_id: str, fs_type: str, done: bool) -> Backing:
        return self._of(self.require(volume_id)).set_made_fs(volume_id, fs_type, done)

    def set_qos(self, volume_id: str, qos_json: str, version: int = 0) -> None:
        """The frontend's tier (its pods' device) and, where this node also holds one of
        the volume's replicas, that replica's record too."""
        local = self.local.get(volume_id)
        if self.frontends.get(volume_id) is not None:
            self.frontends.set_qos(volume_id, qos_json, version)
            if local is not None:
                self.local.set_qos(volume_id, qos_json, version)
            return
        if local is None:
            raise NotFound(f"volume {volume_id} is not on this node")
        self.local.set_qos(volume_id, qos_json, version)

    # --- devices -----------------------------------------------------------------------
    def devices(self, backing: Backing) -> list[Device]:
        return self._of(backing).devices(backing)

    def attach(self, backing: Backing, *, read_only: bool = False) -> Device:
        return self._of(backing).attach(backing, read_only=read_only)

    def release(self, backing: Backing, dev: Device, *, require_released: bool = False) -> None:
        self._of(backing).release(backing, dev, require_released=require_released)

    def refreshed(self, backing: Backing, dev: Device) -> Device:
        return self._of(backing).refreshed(backing, dev)

    def still_holds(self, backing: Backing, dev: Device) -> bool:
        return self._of(backing).still_holds(backing, dev)

    def holds_data(self, backing: Backing, dev: Device) -> bool:
        return self._of(backing).holds_data(backing, dev)

    def filesystem_bytes(self, backing: Backing) -> int:
        return 0 if backing.role == FRONTEND else self.local.filesystem_bytes(backing)

    def storage_missing(self, backing: Backing) -> str:
        return self._of(backing).storage_missing(backing)

    def device_view(self) -> DeviceView:
        return _View(self.local.device_view(), self.frontends)

    def release_unowned(self, records: NodeRecords, table: Iterable[MountEntry]) -> None:
        self.local.release_unowned(records, table)  # frontends are adopted, not swept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)  # the pool's: kind, device_at, create, usage...
