import pytest

from control.policy import MAX_VOLUME_BYTES, MIB, MIN_VOLUME_BYTES, volume_size
from engine.errors import InvalidSpec, OutOfRange

GIB = 1024 * MIB


@pytest.mark.parametrize(
    "required, limit, expected",
    [
        (0, 0, GIB),  # default
        (10 * GIB, 10 * GIB, 10 * GIB),  # exact, as csi-sanity asks
        (1, 0, MIN_VOLUME_BYTES),  # tiny asks get the minimum
        (GIB + 1, 0, GIB + MIB),  # rounded up to whole MiB
        (0, 100 * MIB, 100 * MIB),  # default capped by the limit
        (0, 100 * MIB + 5, 100 * MIB),  # ... rounded down inside it
    ],
)
def test_sizes(required, limit, expected):
    assert volume_size(required, limit, GIB) == expected


@pytest.mark.parametrize(
    "required, limit, error",
    [
        (-1, 0, InvalidSpec),
        (0, -1, InvalidSpec),
        (2 * GIB, GIB, InvalidSpec),  # required above limit
        (GIB + 1, GIB + 2, OutOfRange),  # rounding would pass the limit
        (0, MIB, OutOfRange),  # limit below the minimum
        (MAX_VOLUME_BYTES + 1, 0, OutOfRange),  # absurd
        (2**62, 0, OutOfRange),
    ],
)
def test_size_errors(required, limit, error):
    with pytest.raises(error):
        volume_size(required, limit, GIB)
