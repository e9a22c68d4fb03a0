"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.bench.qos import BLKIO, Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Loop devices, kubelet-like cgroups and fio loads, all undone after the test."""
    if os.geteuid() != 0:
        pytest.fail("needs root: loop devices and cgroup v1 blkio (run the suite as root)")
    if not os.path.isfile(os.path.join(BLKIO, "blkio.throttle.read_iops_device")):
        pytest.fail(f"{BLKIO} has no blkio throttle files: not the cgroup v1 layout expected")
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        problems = the_lab.cleanup()
        assert not problems, problems
