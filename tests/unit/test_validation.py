import grpc
import pytest

from csi import validation
from csi.errors import RpcError
from proto import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode


def cap(mode=Mode.SINGLE_NODE_WRITER, block=False, fs="", flags=()):
    c = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
    if block:
        c.block.SetInParent()
    else:
        c.mount.fs_type = fs
        c.mount.mount_flags.extend(flags)
    return c


def code(fn, *args):
    with pytest.raises(RpcError) as e:
        fn(*args)
    return e.value.code


def test_capabilities():
    assert validation.check_capability(cap()) == "mount"
    assert validation.check_capability(cap(block=True)) == "block"
    assert validation.check_capability(cap(Mode.SINGLE_NODE_MULTI_WRITER, fs="xfs")) == "mount"
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert code(validation.check_capability, cap(Mode.UNKNOWN)) == bad
    assert code(validation.check_capability, cap(Mode.MULTI_NODE_MULTI_WRITER)) == bad
    assert code(validation.check_capability, cap(fs="ntfs")) == bad
    assert code(validation.check_capability, cap(flags=("ro,exec",))) == bad
    assert code(validation.check_capability, csi_pb2.VolumeCapability()) == bad
    assert code(validation.check_capabilities, []) == bad


def test_parameters():
    ok = validation.check_parameters(
        {"tier": "gold", "csi.storage.k8s.io/pvc/name": "x"}, validation.VOLUME_PARAMETER_KEYS, "p")
    assert ok == {"tier": "gold"}
    assert code(validation.check_parameters, {"XXX": "1"}, validation.VOLUME_PARAMETER_KEYS,
                "p") == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["", "a\0b", "x" * 2000, "tab\there"])
def test_bad_names(name):
    assert code(validation.check_name, name) == grpc.StatusCode.INVALID_ARGUMENT


def test_paths(tmp_path):
    assert validation.check_path("/a/b/../c", "p") == "/a/c"
    assert code(validation.check_path, "relative/path", "p") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(validation.check_path, "/a\0b", "p") == grpc.StatusCode.INVALID_ARGUMENT
    root = str(tmp_path)
    assert validation.check_path(f"{root}/x", "p", (root,)) == f"{root}/x"
    assert code(validation.check_path, f"{root}/../escape", "p", (root,)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    (tmp_path / "link").symlink_to("/etc")
    assert code(validation.check_path, f"{root}/link/x", "p", (root,)) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_ids():
    assert validation.well_formed_id("vol-" + "0" * 32)
    for bad in ["fake-vol-id", "../../etc/passwd", "vol-" + "g" * 32, ""]:
        assert not validation.well_formed_id(bad)
