import grpc
import pytest

from csi import validation
from csi.errors import code_for
from engine.errors import EngineError
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
    with pytest.raises(EngineError) as e:
        fn(*args)
    return code_for(e.value)


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
    policy = validation.PathPolicy.of((root,), ())
    assert validation.check_path(f"{root}/x", "p", policy) == f"{root}/x"
    assert code(validation.check_path, f"{root}/../escape", "p", policy) == \
        grpc.StatusCode.INVALID_ARGUMENT
    (tmp_path / "link").symlink_to("/etc")
    assert code(validation.check_path, f"{root}/link/x", "p", policy) == \
        grpc.StatusCode.INVALID_ARGUMENT


SYSTEM_PATHS = ["/", "/etc", "/etc/kubernetes", "/usr/lib/x", "/bin", "/sbin/x", "/lib",
                "/lib64/x", "/boot", "/dev/shm", "/proc/1", "/sys/fs", "/run", "/run/x",
                "/var/../etc", "//etc"]


@pytest.mark.parametrize("path", SYSTEM_PATHS)
def test_system_paths_are_refused_whatever_the_flags(path):
    for policy in (validation.PathPolicy(), validation.PathPolicy.of(("/",), ()),
                   validation.PathPolicy.of(("/etc", "/run"), ())):
        with pytest.raises(EngineError) as e:
            validation.check_path(path, "staging_target_path", policy)
        assert code_for(e.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert "refused" in str(e.value) or "outside" in str(e.value)


def test_defaults_keep_the_places_the_co_and_csi_sanity_use():
    policy = validation.PathPolicy.of((), ("/var/lib/tandem", "/run/tandem/csi.sock"))
    for path in ["/tmp/csi-mount/target", "/tmp/csi-staging",
                 "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pv/mount",
                 "/var/lib/kubelet/plugins/kubernetes.io/csi/tandem.csi.dev/x/globalmount"]:
        assert validation.check_path(path, "p", policy) == path


def test_run_opens_only_inside_an_allowed_root_below_it():
    policy = validation.PathPolicy.of(("/run/kubelet",), ())
    assert validation.check_path("/run/kubelet/pods/x", "p", policy) == "/run/kubelet/pods/x"
    assert code(validation.check_path, "/run/other", "p", policy) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_the_drivers_own_files_are_refused(tmp_path):
    state = tmp_path / "state"
    (state / "pool").mkdir(parents=True)
    (tmp_path / "to-state").symlink_to(state)
    policy = validation.PathPolicy.of((), (str(state), str(state / "pool"),
                                          str(tmp_path / "csi.sock")))
    for path in [state, state / "pool" / "x", tmp_path / "to-state" / "sub", tmp_path,
                 tmp_path / "csi.sock", "/" + str(tmp_path).split("/")[1]]:
        assert code(validation.check_path, str(path), "p", policy) == \
            grpc.StatusCode.INVALID_ARGUMENT
    assert validation.check_path(str(tmp_path / "staging"), "p", policy) == \
        str(tmp_path / "staging")


def test_ids():
    assert validation.well_formed_id("vol-" + "0" * 32)
    for bad in ["fake-vol-id", "../../etc/passwd", "vol-" + "g" * 32, ""]:
        assert not validation.well_formed_id(bad)
