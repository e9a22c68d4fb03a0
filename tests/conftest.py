import os
import uuid

import pytest

from tests import support
from tests.etcd_cluster import EtcdCluster


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


@pytest.fixture(scope="session")
def etcd_url():
    """One etcd member on loopback for the whole run; each user takes a namespace of its
    own (etcd_namespace), so tests never see each other's records."""
    root = support.make_root("tdm-etcd-")
    cluster = EtcdCluster(root).start()
    try:
        yield cluster.url
    finally:
        cluster.close()
        support.cleanup_tree(root)


def etcd_namespace() -> str:
    return f"/tandem-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="session")
def rgw():
    """One radosgw (monitor, memstore OSD, gateway) on loopback for the whole run; each
    user takes a bucket of its own (tests/integration/test_backup.py)."""
    from tests.rgw import RadosGateway

    root = support.make_root("tdm-rgw-")
    gateway = RadosGateway(root)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.close()
        support.cleanup_tree(root)
