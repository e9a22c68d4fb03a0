"""Is a CreateVolume for an existing name a retry of the request that made it?

The name's record keeps a hash of the request that made the volume: the same hash is the
same request (the common retry). Otherwise the CSI spec's rule decides: a volume of that
name that is *compatible* with the request answers OK (the same volume again), one that is
not answers ALREADY_EXISTS. "Compatible", field by field:

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
- accessibility requirements: one of the volume's topology segments must match one of the
  `requisite` topologies when any are given (the spec lists accessibility among the reasons
  for ALREADY_EXISTS). `preferred` is only a preference, so it is not compared.

Pure functions of the request and the record: unit-tested without a driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control.records import VolumeRecord

# (access type, access mode name, filesystem type or "" for block)
CapabilityKey = tuple[str, str, str]


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


def _fits(size: int, required: int, limit: int) -> bool:
    return (not required or size >= required) and (not limit or size <= limit)


def _differing_keys(a: Mapping[str, str], b: Mapping[str, str]) -> str:
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def incompatibility(vol: VolumeRecord, ask: CreateAsk) -> str:
    """Why `vol` does not answer `ask` ('' when it does)."""
    if dict(ask.parameters) != vol.parameters:
        return f"other parameters ({_differing_keys(ask.parameters, vol.parameters)})"
    if dict(ask.mutable_parameters) != vol.created_mutable_parameters:
        keys = _differing_keys(ask.mutable_parameters, vol.created_mutable_parameters)
        return f"other mutable parameters than at its creation ({keys})"
    if (ask.source_kind, ask.source_id) != (vol.source_kind, vol.source_id):
        return "another content source"
    extra = sorted(ask.capabilities - set(vol.capabilities))
    if extra:
        wanted = "; ".join(" ".join(filter(None, c)) for c in extra)
        return f"capabilities it was not made with ({wanted})"
    sizes = {vol.capacity_bytes, vol.created_bytes or vol.capacity_bytes}
    if not any(_fits(s, ask.required_bytes, ask.limit_bytes) for s in sizes):
        return (f"{vol.capacity_bytes} bytes, outside the range asked "
                f"({ask.required_bytes}..{ask.limit_bytes or 'unlimited'})")
    if ask.requisite and not any(all(seg.get(k) == v for k, v in t.items())
                                 for t in ask.requisite for seg in vol.segments):
        return f"a topology outside the requisite ones ({vol.segments})"
    return ""
