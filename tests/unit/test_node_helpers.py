"""Small pieces of the node path that need no root: the kernel's device-number format of
LOOP_GET_STATUS64, and the roll-back of a failed call."""

import os

import pytest

from engine.loopdev import _decode_huge_dev
from engine.rollback import Rollback


def huge_encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev() (include/linux/kdev_t.h), as lo_device carries it."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@pytest.mark.parametrize("major, minor", [(254, 0), (0, 45), (8, 17), (259, 300), (0, 1048575)])
def test_lo_device_decodes_to_the_st_dev_of_the_file(major, minor):
    assert _decode_huge_dev(huge_encode_dev(major, minor)) == os.makedev(major, minor)


def test_rollback_undoes_newest_first_only_on_failure_and_keeps_the_error():
    done = []
    with Rollback() as undo:
        undo.add("a", done.append, "a")
    assert done == []  # success: nothing undone

    def broken():
        raise OSError("undo step failed")

    with pytest.raises(KeyError), Rollback() as undo:
        undo.add("a", done.append, "a")
        undo.add("broken", broken)
        undo.add("b", done.append, "b")
        raise KeyError("the call failed")
    assert done == ["b", "a"]  # every step ran, newest first, despite one failing
