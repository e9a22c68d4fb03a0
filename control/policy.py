"""Pure policy shared by the controller and the node side: volume sizes and the admission
of guaranteed IOPS. No I/O, no engine, no grpc.

Sizes are whole MiB, so 1 GiB multiples stay exact (csi-sanity's limit_bytes of 10 GiB
means exactly 10 GiB). A size that rounding would push past the limit is OUT_OF_RANGE.
Admission: the sum of minima placed on a node never exceeds its IOPS capacity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine.errors import InvalidSpec, OutOfCapacity, OutOfRange
from engine.qos.tiers import QosSpec

MIB = 1024 * 1024
GIB = 1024 * MIB
MIN_VOLUME_BYTES = 16 * MIB
XFS_MIN_BYTES = 300 * MIB  # mkfs.xfs refuses smaller filesystems
# Beyond any pool we expect; catches unit mix-ups (bytes given as KiB) early.
MAX_VOLUME_BYTES = 256 * 1024**4


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def volume_size(required: int, limit: int, default: int, minimum: int = MIN_VOLUME_BYTES) -> int:
    if required < 0 or limit < 0:
        raise InvalidSpec("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidSpec(f"required_bytes {required} is above limit_bytes {limit}")
    if required:
        size = max(_round_up(required, MIB), minimum)
    else:
        size = max(default, minimum)
        if limit:
            size = min(size, limit // MIB * MIB)
    if limit and size > limit:
        raise OutOfRange(f"the smallest size possible, {size} bytes, is above limit_bytes {limit}")
    if size < minimum:
        raise OutOfRange(f"volumes are at least {minimum} bytes; limit_bytes {limit} is below")
    if size > MAX_VOLUME_BYTES:
        raise OutOfRange(f"{size} bytes is above the largest volume, {MAX_VOLUME_BYTES} bytes")
    return size


def thin_available_bytes(free_bytes: int, reserve_bytes: int, overcommit_ratio: float,
                         provisioned_bytes: int) -> int:
    """Bytes a node may still promise: its free space times the overcommit ratio, less
    what is promised already (volumes are sparse)."""
    thin = int((free_bytes - reserve_bytes) * overcommit_ratio)
    return max(0, thin - provisioned_bytes)


# --- guaranteed IOPS -----------------------------------------------------------------
def reserved_iops(specs: Iterable[QosSpec]) -> int:
    """Guaranteed IOPS already promised (reads and writes count alike)."""
    return sum(s.min_iops for s in specs)


def headroom_iops(capacity_iops: int, specs: Iterable[QosSpec]) -> int:
    """Guaranteed IOPS still free (0 when the node is full or over-committed)."""
    return max(0, capacity_iops - reserved_iops(specs))


def can_place(
    capacity_iops: int, placed: Mapping[str, QosSpec], spec: QosSpec, volume_id: str = ""
) -> bool:
    """Would `spec` fit beside the volumes already placed? `volume_id`'s own current spec
    (a tier change) is not counted twice."""
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
