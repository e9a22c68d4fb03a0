import os

import pytest

from tests import support


def require_root() -> None:
    """Storage tests fail without root rather than skip: a skipped storage test hides gaps."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (loop devices, mounts, cgroups)", pytrace=False)


@pytest.fixture
def test_root():
    require_root()
    root = support.make_root()
    try:
        yield root
    finally:
        support.cleanup_tree(root)


@pytest.fixture
def driver(test_root):
    d = support.InProcessDriver(support.test_config(test_root))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def stubs(driver):
    return driver.stubs
