"""The committed stubs are exactly what grpcio-tools makes from proto/csi.proto."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATED = ["csi_pb2.py", "csi_pb2_grpc.py"]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", "proto/csi.proto"],
        check=True, cwd=REPO,
    )
    for name in GENERATED:
        with open(os.path.join(REPO, "proto", name)) as committed, \
                open(tmp_path / "proto" / name) as fresh:
            assert committed.read() == fresh.read(), f"proto/{name} is stale: run `make proto`"


def test_wire_package_and_services():
    from proto import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert set(csi_pb2.DESCRIPTOR.services_by_name) == {
        "Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}
    fields = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert fields["mutable_parameters"].number == 8
    assert fields["secrets"].GetOptions().Extensions[csi_pb2.csi_secret]
