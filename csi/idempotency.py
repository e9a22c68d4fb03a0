"""Is a CreateVolume for an existing name a retry of the request that made it?

CSI: a volume of that name that is compatible with the request answers OK (the same volume
again); one that is not answers ALREADY_EXISTS. "Compatible" here, field by field:

- parameters: equal, once the sidecars' `csi.storage.k8s.io/*` keys are dropped (they carry
  the PVC's name and namespace, which a retry may spell differently; they never shape the
  volume). A StorageClass's parameters are immutable, so a real retry repeats them exactly.
- mutable_parameters: equal to those given *at creation*, not to the volume's current ones:
  a ControllerModifyVolume since then must not turn a retry of the original create into
  ALREADY_EXISTS (the provisioner may retry after a lost reply), nor make a request for the
  new tier look like that original one.
- content source: the same kind and ID (or none both times).
- volume capabilities: each one asked for is among those the volume was made with, compared
  by access type, access mode and filesystem type (empty means the default, ext4). Mount
  flags and the mount group are not compared: they act at publish time, where the CO sends
  them again, and do not shape the volume.
- capacity range: satisfied by the volume's size now, or by the size it was made with (a
  retry of the original create after an expansion).
- accessibility requirements: the volume's topology must match one of the `requisite`
  topologies when any are given (the spec lists accessibility among the reasons for
  ALREADY_EXISTS: a volume the CO cannot reach from where it asked is no answer). `preferred`
  is only a preference, as when placing a volume, so it is not compared.

Pure functions of the request and the record: unit-tested without a driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from csi import validation
from csi.catalog import VolumeRecord
from engine.filesystem import check_fs_type
from engine.node_volumes import MOUNT
from proto import csi_pb2

# (access type, access mode name, filesystem type or "" for block)
CapabilityKey = tuple[str, str, str]


def capability_key(cap: csi_pb2.VolumeCapability) -> CapabilityKey:
    """A capability as compared between a create and its retries (already validated)."""
    kind = validation.access_type(cap)
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.Name(cap.access_mode.mode)
    fs_type = check_fs_type(cap.mount.fs_type) if kind == MOUNT else ""
    return kind, mode, fs_type


@dataclass(frozen=True)
class CreateAsk:
    """What one CreateVolumeRequest asks for, normalised for comparison."""

    parameters: Mapping[str, str]
    mutable_parameters: Mapping[str, str]
    capabilities: frozenset[CapabilityKey]
    required_bytes: int
    limit_bytes: int
    source_kind: str
    source_id: str
    requisite: tuple[Mapping[str, str], ...] = ()

    @classmethod
    def from_request(cls, req: csi_pb2.CreateVolumeRequest, parameters: Mapping[str, str],
                     mutable_parameters: Mapping[str, str], source_kind: str,
                     source_id: str) -> CreateAsk:
        """`parameters` and `mutable_parameters` as validation.check_parameters left them."""
        return cls(
            parameters=dict(parameters),
            mutable_parameters=dict(mutable_parameters),
            capabilities=frozenset(capability_key(c) for c in req.volume_capabilities),
            required_bytes=req.capacity_range.required_bytes,
            limit_bytes=req.capacity_range.limit_bytes,
            source_kind=source_kind,
            source_id=source_id,
            requisite=tuple(dict(t.segments)
                            for t in req.accessibility_requirements.requisite),
        )


def _fits(size: int, required: int, limit: int) -> bool:
    return (not required or size >= required) and (not limit or size <= limit)


def _differing_keys(a: Mapping[str, str], b: Mapping[str, str]) -> str:
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def incompatibility(vol: VolumeRecord, ask: CreateAsk, topology: Mapping[str, str]) -> str:
    """Why `vol` does not answer `ask` ('' when it does). `topology`: where vol is reachable."""
    if ask.parameters != vol.parameters:
        return f"other parameters ({_differing_keys(ask.parameters, vol.parameters)})"
    made_mutable = (vol.created_mutable_parameters if vol.created_mutable_parameters is not None
                    else vol.mutable_parameters)  # a record from before they were kept apart
    if ask.mutable_parameters != made_mutable:
        keys = _differing_keys(ask.mutable_parameters, made_mutable)
        return f"other mutable parameters than at its creation ({keys})"
    if (ask.source_kind, ask.source_id) != (vol.source_kind, vol.source_id):
        return "another content source"
    if vol.capabilities:
        extra = sorted(ask.capabilities - set(vol.capabilities))
    else:  # a record from before capabilities were kept: it knows its access types only
        extra = sorted(c for c in ask.capabilities if c[0] not in vol.access_types)
    if extra:
        wanted = "; ".join(" ".join(filter(None, c)) for c in extra)
        return f"capabilities it was not made with ({wanted})"
    sizes = {vol.capacity_bytes, vol.created_bytes or vol.capacity_bytes}
    if not any(_fits(s, ask.required_bytes, ask.limit_bytes) for s in sizes):
        return (f"{vol.capacity_bytes} bytes, outside the range asked "
                f"({ask.required_bytes}..{ask.limit_bytes or 'unlimited'})")
    if ask.requisite and not any(all(topology.get(k) == v for k, v in t.items())
                                 for t in ask.requisite):
        return f"a topology outside the requisite ones ({dict(topology)})"
    return ""
