"""Capacity ranges to volume sizes.

Sizes are whole MiB, so 1 GiB multiples stay exact (csi-sanity's limit_bytes of 10 GiB
means exactly 10 GiB). A size that rounding would push past the limit is OUT_OF_RANGE.
"""

from __future__ import annotations

from engine.errors import InvalidSpec, OutOfRange

MIB = 1024 * 1024
MIN_VOLUME_BYTES = 16 * MIB
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
