import pytest

from tests.etcd_cluster import EtcdCluster
from tests.store_backends import EtcdBackend, SqliteBackend


@pytest.fixture(scope="session")
def etcd1(tmp_path_factory):
    """One etcd member shared by the store tests (each test writes under its own namespace)."""
    with EtcdCluster(str(tmp_path_factory.mktemp("etcd1")), size=1) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    """Each cluster store in turn; stores opened through it are closed after the test."""
    if request.param == "sqlite":
        b = SqliteBackend(str(tmp_path))
    else:
        cluster = request.getfixturevalue("etcd1")
        if not all(m.running() for m in cluster.members):  # a test killed it: bring it back
            for m in cluster.members:
                if not m.running():
                    m.start()
            cluster.wait_healthy()
        b = EtcdBackend(cluster)
    try:
        yield b
    finally:
        b.close()
    if request.param == "etcd":
        b.cluster.check_running()


@pytest.fixture
def store(backend):
    return backend.open()
