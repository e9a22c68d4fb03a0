"""The committed stubs are exactly what grpcio-tools makes from proto/csi.proto,
proto/agent.proto (the node agent's API) and proto/etcd/*.proto (etcd v3.4.23's API,
trimmed by scripts/trim_etcd_proto.py)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATED = {"csi.proto": ["csi_pb2.py", "csi_pb2_grpc.py"],
             "agent.proto": ["agent_pb2.py", "agent_pb2_grpc.py"]}
ETCD_PROTOS = ["kv", "auth", "rpc"]


@pytest.mark.parametrize("proto", sorted(GENERATED))
def test_stubs_match_the_proto(tmp_path, proto):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"proto/{proto}"],
        check=True, cwd=REPO,
    )
    for name in GENERATED[proto]:
        with open(os.path.join(REPO, "proto", name)) as committed, \
                open(tmp_path / "proto" / name) as fresh:
            assert committed.read() == fresh.read(), f"proto/{name} is stale: run `make proto`"


def test_etcd_stubs_match_their_protos(tmp_path):
    protos = [f"proto/etcd/{name}.proto" for name in ETCD_PROTOS]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *protos],
        check=True, cwd=REPO,
    )
    for name in ETCD_PROTOS:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            path = os.path.join("proto", "etcd", name + suffix)
            with open(os.path.join(REPO, path)) as committed, open(tmp_path / path) as fresh:
                assert committed.read() == fresh.read(), f"{path} is stale: run `make proto`"


def test_etcd_protos_keep_etcds_wire_names():
    """Trimming removed Go annotations only: the services and packages etcd serves."""
    from proto.etcd import kv_pb2, rpc_pb2

    assert rpc_pb2.DESCRIPTOR.package == "etcdserverpb"
    assert kv_pb2.DESCRIPTOR.package == "mvccpb"
    assert set(rpc_pb2.DESCRIPTOR.services_by_name) == {
        "KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"}
    txn = rpc_pb2.TxnRequest.DESCRIPTOR.fields_by_name
    assert [txn[f].number for f in ("compare", "success", "failure")] == [1, 2, 3]
    for path in ("proto/etcd/rpc.proto", "proto/etcd/kv.proto"):
        with open(os.path.join(REPO, path)) as f:
            text = f.read()
        assert "gogoproto" not in text and "google.api" not in text
        assert text.startswith("// From etcd v3.4.23")


def test_wire_package_and_services():
    from proto import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert set(csi_pb2.DESCRIPTOR.services_by_name) == {
        "Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}
    fields = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert fields["mutable_parameters"].number == 8
    assert fields["secrets"].GetOptions().Extensions[csi_pb2.csi_secret]
