import pytest

from tests.etcd_cluster import EtcdCluster


@pytest.fixture(scope="session")
def etcd1(tmp_path_factory):
    """One etcd member shared by the store tests (each test writes under its own namespace)."""
    with EtcdCluster(str(tmp_path_factory.mktemp("etcd1")), size=1) as cluster:
        yield cluster
