"""A CreateVolumeRequest in the terms of the create-retry rule (control/idempotency.py)."""

from __future__ import annotations

from collections.abc import Mapping

from control.idempotency import CapabilityKey, CreateAsk
from csi import validation
from engine.access import MOUNT, check_fs_type
from proto import csi_pb2


def capability_key(cap: csi_pb2.VolumeCapability) -> CapabilityKey:
    """A capability as compared between a create and its retries (already validated)."""
    kind = validation.access_type(cap)
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.Name(cap.access_mode.mode)
    fs_type = check_fs_type(cap.mount.fs_type) if kind == MOUNT else ""
    return kind, mode, fs_type


def create_ask(req: csi_pb2.CreateVolumeRequest, parameters: Mapping[str, str],
               mutable_parameters: Mapping[str, str], source_kind: str,
               source_id: str) -> CreateAsk:
    """`parameters` and `mutable_parameters` as validation.check_parameters left them."""
    return CreateAsk(
        parameters=dict(parameters),
        mutable_parameters=dict(mutable_parameters),
        capabilities=frozenset(capability_key(c) for c in req.volume_capabilities),
        required_bytes=req.capacity_range.required_bytes,
        limit_bytes=req.capacity_range.limit_bytes,
        source_kind=source_kind,
        source_id=source_id,
        requisite=tuple(dict(t.segments) for t in req.accessibility_requirements.requisite),
    )
