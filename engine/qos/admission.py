"""Admission of guaranteed minima: the sum of minima placed on a node never exceeds its pool's
IOPS capacity (measured or set: engine/qos/capacity.py). Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.errors import InvalidSpec, OutOfCapacity
from engine.qos.tiers import QosSpec


def reserved_iops(specs: Iterable[QosSpec]) -> int:
    """Guaranteed IOPS already promised (reads and writes count alike)."""
    return sum(s.min_iops for s in specs)


def fits(capacity_iops: int, specs: Iterable[QosSpec]) -> bool:
    return reserved_iops(specs) <= capacity_iops


def headroom_iops(capacity_iops: int, specs: Iterable[QosSpec]) -> int:
    """Guaranteed IOPS still free (0 when the node is full or over-committed)."""
    return max(0, capacity_iops - reserved_iops(specs))


def can_place(
    capacity_iops: int, placed: Mapping[str, QosSpec], spec: QosSpec, volume_id: str = ""
) -> bool:
    """Would `spec` fit beside the volumes already placed? `volume_id`'s own current spec
    (a tier change) is not counted twice. For GetCapacity with a tier."""
    others = (s for vid, s in placed.items() if vid != volume_id)
    return spec.min_iops <= headroom_iops(capacity_iops, others)


def check_admission(
    capacity_iops: int, placed: Mapping[str, QosSpec], volume_id: str, spec: QosSpec
) -> None:
    """InvalidSpec if the minimum could never fit on this node (a permanent problem:
    INVALID_ARGUMENT); OutOfCapacity if it only lacks room now (RESOURCE_EXHAUSTED, retried)."""
    if spec.min_iops > capacity_iops:
        raise InvalidSpec(
            f"tier {spec.name or '(custom)'} guarantees {spec.min_iops} IOPS, more than the "
            f"node's whole capacity of {capacity_iops}"
        )
    if not can_place(capacity_iops, placed, spec, volume_id):
        free = headroom_iops(capacity_iops, (s for v, s in placed.items() if v != volume_id))
        raise OutOfCapacity(
            f"{volume_id}: {spec.min_iops} guaranteed IOPS asked, {free} of {capacity_iops} free"
        )
