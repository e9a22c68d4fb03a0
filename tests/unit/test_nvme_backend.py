"""The NVMe backend against recorded nvme-cli outputs, without root or NVMe hardware.

tests/unit/nvme_recorded/ holds what nvme-cli 2.3 answered QEMU 7.2's emulated controller
in the tests/vm guest (exit statuses, stderr, JSON), and, for the one thing no drive here
can do (create-ns/delete-ns: QEMU answers Invalid Command Opcode), a drive with Namespace
Management in nvme-cli's own output formats (see that file's _about). FakeDrive replays
them as nvme-cli would print them, keeping which namespaces exist and are attached;
FakeSysfs shows the attached ones as "block devices" that are files here, so the real
backend code runs around them: create-ns parsing, records, attach, the label written
and read with O_DIRECT, identity checks, delete, start-up checks and the store rebuilt
from labels. The same paths run for real on QEMU in tests/integration/test_nvme_guest.py
(pool mode: attach/detach; manage mode: its start-up refusal).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest

from control.volumes import VolumePolicy
from csi.errors import code_for
from csi.server import parse_nsids
from engine.errors import (
    AlreadyExists,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    Precondition,
    Unavailable,
)
from engine.nvme import backend as nvme
from engine.nvme import label as labels
from engine.nvme import status as st
from engine.nvme.cli import NvmeCli, parse_id_ctrl, parse_id_ns, parse_nsid_list
from engine.nvme.sysfs import Controller, NamespaceDevice, NvmeSysfs
from engine.state import SqliteStore

HERE = os.path.join(os.path.dirname(__file__), "nvme_recorded")
MIB = 1024 * 1024
NQN = "nqn.2019-08.org.qemu:tandem-nvme"


def recorded(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


QEMU = json.loads(recorded("qemu-statuses.json"))
DRIVE = json.loads(recorded("ns-mgmt-drive.json"))


def proc(argv, reply: dict, **fmt) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(argv, reply["rc"], reply["stdout"].format(**fmt),
                                       reply["stderr"])


@dataclass
class FakeDrive:
    """nvme-cli in front of one controller (cntlid 0), answering as recorded."""

    ns_management: bool = True  # False: QEMU (Invalid Command Opcode)
    unallocated: int = int(DRIVE["id-ctrl-overrides"]["unvmcap"])
    namespaces: dict[int, int] = field(default_factory=dict)  # nsid -> blocks of 4096
    attached: set[int] = field(default_factory=set)
    fail: dict[str, dict] = field(default_factory=dict)  # command -> recorded failure
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, argv, *, timeout_s=0.0, check=True):
        self.calls.append(list(argv))
        cmd, args = argv[1], dict(a.split("=", 1) for a in argv[3:] if "=" in a)
        if cmd in self.fail:
            return proc(argv, self.fail.pop(cmd))
        nsid = int(args.get("--namespace-id", "0"), 0)
        if cmd == "id-ctrl":
            doc = json.loads(recorded("qemu-id-ctrl.json"))
            if self.ns_management:
                doc.update(DRIVE["id-ctrl-overrides"])
                doc["unvmcap"] = str(self.unallocated)
            return subprocess.CompletedProcess(argv, 0, json.dumps(doc), "")
        if cmd == "admin-passthru":
            reply = DRIVE if self.ns_management else QEMU
            return proc(argv, reply["admin-passthru-ns-mgmt-reserved-sel"])
        if cmd == "create-ns":
            if not self.ns_management:
                return proc(argv, QEMU["create-ns"])
            blocks = int(args["--nsze"])
            if blocks * 4096 > self.unallocated:
                return proc(argv, DRIVE["create-ns-insufficient-capacity"])
            new = max(self.namespaces, default=0) + 1
            self.namespaces[new] = blocks
            self.unallocated -= blocks * 4096
            return proc(argv, DRIVE["create-ns"], nsid=new)
        if cmd == "delete-ns":
            if not self.ns_management:
                return proc(argv, QEMU["delete-ns"])
            if nsid not in self.namespaces:
                return proc(argv, QEMU["attach-ns-no-such-namespace"])
            self.unallocated += self.namespaces.pop(nsid) * 4096
            self.attached.discard(nsid)
            return proc(argv, DRIVE["delete-ns"], nsid=nsid)
        if cmd == "id-ns":
            doc = json.loads(recorded("qemu-id-ns-1-force.json"))
            doc["nsze"] = doc["ncap"] = doc["nuse"] = self.namespaces.get(nsid, 0)
            doc["flbas"] = 4  # 4096-byte blocks, no metadata (QEMU's index 4)
            return subprocess.CompletedProcess(argv, 0, json.dumps(doc), "")
        if cmd == "attach-ns":
            if args.get("--controllers") != "0":
                return proc(argv, QEMU["attach-ns-bad-controller"])
            if nsid not in self.namespaces:
                return proc(argv, QEMU["attach-ns-no-such-namespace"])
            if nsid in self.attached:
                return proc(argv, QEMU["attach-ns-already-attached"])
            self.attached.add(nsid)
            return proc(argv, QEMU["attach-ns"])
        if cmd == "detach-ns":
            if nsid not in self.attached:
                return proc(argv, QEMU["detach-ns-not-attached"])
            self.attached.discard(nsid)
            return proc(argv, QEMU["detach-ns"])
        if cmd == "list-ns":
            ids = sorted(self.namespaces if "--all" in argv else self.attached)
            return subprocess.CompletedProcess(
                argv, 0, json.dumps({"nsid_list": [{"nsid": n} for n in ids]}), "")
        if cmd == "ns-rescan":
            return proc(argv, QEMU["ns-rescan"])
        raise AssertionError(f"unexpected nvme-cli call {argv}")


class FakeSysfs(NvmeSysfs):
    """The drive's attached namespaces as block devices that are sparse files here, named
    in attach order as the kernel does (NSID 3 attached first is nvme0n1)."""

    def __init__(self, drive: FakeDrive, dev_root: str):
        super().__init__("/nonexistent", dev_root)
        self.drive = drive
        self.names: dict[int, str] = {}
        self.generation: dict[int, int] = {}

    def controller(self, subsysnqn: str, name: str = "") -> Controller:
        return Controller("nvme0", subsysnqn, 0, "live", "Example", "EX123")

    def namespaces(self, subsysnqn: str) -> list[NamespaceDevice]:
        found = []
        for nsid in sorted(self.drive.attached):
            name = self.names.setdefault(nsid, f"nvme0n{len(self.names) + 1}")
            path = os.path.join(self.dev_root, name)
            size = self.drive.namespaces[nsid] * 4096
            if not os.path.exists(path) or os.path.getsize(path) != size:
                with open(path, "wb") as f:
                    f.truncate(size)
            found.append(NamespaceDevice(
                name, nsid, subsysnqn, 259, nsid, size, 4096,
                f"eui.fake{nsid}-{self.generation.get(nsid, 0)}", "", False, self.dev_root))
        return found

    def wait_namespace(self, subsysnqn, nsid, timeout_s, size_bytes=0):
        dev = self.namespace(subsysnqn, nsid)
        if dev is None:
            raise Unavailable(f"namespace {nsid} got no block device")
        return dev

    def wait_gone(self, subsysnqn, nsid, timeout_s):
        assert self.namespace(subsysnqn, nsid) is None


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(drive: FakeDrive | None = None, store_name: str = "state.sqlite",
             **config) -> nvme.NvmeBackend:
        drive = drive or FakeDrive()
        dev_root = tmp_path / "dev"
        dev_root.mkdir(exist_ok=True)
        store = SqliteStore(str(tmp_path / store_name))
        sysfs = made[0][1] if made and made[0][0] is drive else FakeSysfs(drive, str(dev_root))
        backend = nvme.NvmeBackend(store, nvme.NvmeConfig(NQN, node_id="n1", **config),
                                   cli=NvmeCli("/dev/nvme0", runner=drive), sysfs=sysfs)
        made.append((drive, sysfs, store))
        return backend

    yield make
    for _, _, store in made:
        store.close()


def opened(backend: nvme.NvmeBackend) -> nvme.NvmeBackend:
    backend.open()
    backend.reconcile()
    return backend


def drive_of(backend: nvme.NvmeBackend) -> FakeDrive:
    return backend.cli.runner  # type: ignore[return-value]


# --- statuses ------------------------------------------------------------------------
@pytest.mark.parametrize("command,reply,domain,key,code", [
    ("create-ns", QEMU["create-ns"], Precondition, st.INVALID_OPCODE, "FAILED_PRECONDITION"),
    ("attach-ns", QEMU["attach-ns-already-attached"], AlreadyExists, st.NS_ALREADY_ATTACHED,
     "ALREADY_EXISTS"),
    ("detach-ns", QEMU["detach-ns-not-attached"], NotFound, st.NS_NOT_ATTACHED, "NOT_FOUND"),
    ("attach-ns", QEMU["attach-ns-no-such-namespace"], NotFound, st.INVALID_FIELD,
     "NOT_FOUND"),
    ("create-ns", DRIVE["create-ns-invalid-format"], InvalidSpec, st.INVALID_FIELD,
     "INVALID_ARGUMENT"),
    ("attach-ns", QEMU["attach-ns-bad-controller"], Precondition, st.CONTROLLER_LIST_INVALID,
     "FAILED_PRECONDITION"),
    ("id-ns", QEMU["id-ns-common"], NotFound, st.INVALID_NAMESPACE, "NOT_FOUND"),
    ("create-ns", DRIVE["create-ns-insufficient-capacity"], OutOfCapacity,
     st.NS_INSUFFICIENT_CAPACITY, "RESOURCE_EXHAUSTED"),
    ("create-ns", DRIVE["create-ns-id-unavailable"], OutOfCapacity, st.NS_ID_UNAVAILABLE,
     "RESOURCE_EXHAUSTED"),
    ("id-ctrl", QEMU["id-ctrl-no-device"], NotFound, None, "NOT_FOUND"),
])
def test_every_recorded_failure_is_classified(command, reply, domain, key, code):
    argv = ["nvme", command, "/dev/nvme0", "--namespace-id=3"]
    err = st.classify(command, argv, reply["rc"], reply["stdout"], reply["stderr"])
    assert isinstance(err, domain) and isinstance(err, st.NvmeFailed)
    assert (err.status.key if err.status else None) == key
    assert code_for(err) == getattr(grpc.StatusCode, code)
    assert f"nvme {command}" in str(err) and err.stderr == reply["stderr"]


def test_status_value_fields():
    status = st.parse_status(QEMU["attach-ns-already-attached"]["stderr"])
    assert status == st.NvmeStatus(1, 0x18, True, status.text)
    assert "Namespace Already Attached" in status.text
    assert st.parse_status("nvme: unrecognized option '-o'") is None


def test_a_timeout_or_a_missing_nvme_cli_is_unavailable_or_a_precondition():
    err = st.classify("id-ctrl", ["nvme", "id-ctrl", "/dev/nvme0"], -1, "", "timed out after 60s")
    assert isinstance(err, Unavailable) and err.status is None
    err = st.classify("id-ctrl", ["nvme", "id-ctrl"], 127, "", "nvme: command not found")
    assert isinstance(err, Precondition) and "nvme-cli" in str(err)


# --- parsing -------------------------------------------------------------------------
def test_recorded_json_parses():
    ctrl = parse_id_ctrl(recorded("qemu-id-ctrl.json"))
    assert ctrl.advertises_ns_management and ctrl.namespaces_max == 256
    assert ctrl.subnqn.endswith(":test") and ctrl.total_bytes == 0  # QEMU reports none
    ns = parse_id_ns(recorded("qemu-id-ns-1-force.json"), 1)
    assert (ns.size_blocks, ns.block_bytes, ns.size_bytes) == (131072, 512, 64 * MIB)
    assert [(f.index, f.data_bytes, f.metadata_bytes) for f in ns.lba_formats][4] == (4, 4096, 0)
    detached = parse_id_ns(recorded("qemu-id-ns-1-detached-no-force.json"), 1)
    assert not detached.exists  # why id-ns always goes with --force
    assert parse_nsid_list(recorded("qemu-list-ns-all.json")) == [1, 2, 3]


def test_nsid_zero_and_all_are_never_sent(rig):
    backend = rig()
    for nsid in (0, 0xFFFFFFFF):
        with pytest.raises(InvalidSpec):
            backend.cli.delete_ns(nsid)
    assert drive_of(backend).calls == []


def test_sysfs_finds_namespaces_by_nqn_and_nsid(tmp_path):
    sysfs = tmp_path / "sys"

    def write(rel: str, text: str) -> None:
        path = sysfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    for ctrl, nqn in (("nvme0", NQN), ("nvme1", "nqn.other")):
        write(f"class/nvme/{ctrl}/subsysnqn", nqn)
        write(f"class/nvme/{ctrl}/cntlid", "0" if ctrl == "nvme0" else "1")
        write(f"class/nvme/{ctrl}/state", "live")
    # multipath head disk nvme0n1 (NSID 2), its hidden path nvme0c0n1, another subsystem's
    for name, nsid, nqn in (("nvme0n1", 2, NQN), ("nvme0c0n1", 2, NQN),
                            ("nvme1n1", 1, "nqn.other")):
        write(f"block/{name}/nsid", str(nsid))
        write(f"block/{name}/device/subsysnqn", nqn)
        write(f"block/{name}/dev", "259:3" if name == "nvme0n1" else "259:9")
        write(f"block/{name}/size", "131072")
        write(f"block/{name}/queue/logical_block_size", "512")
        write(f"block/{name}/wwid", f"nvme.1b36-{name}")
    s = NvmeSysfs(str(sysfs), str(tmp_path / "dev"))
    assert s.controller(NQN).name == "nvme0"
    (dev,) = s.namespaces(NQN)
    assert (dev.name, dev.nsid, dev.major, dev.minor, dev.size_bytes) == ("nvme0n1", 2, 259, 3,
                                                                          64 * MIB)
    assert s.namespace(NQN, 1) is None
    with pytest.raises(NotFound, match="nqn.other"):
        s.controller("nqn.missing")
    with pytest.raises(Unavailable, match="no block device"):
        s.wait_namespace(NQN, 2, 0.05)  # in sysfs, but no node in /dev


def test_label_round_trip_and_damage(tmp_path):
    lab = labels.Label(labels.VOLUME, "vol-1", 32 * MIB, ("block",), 1.5, 4096, "n1")
    block = lab.encode()
    assert len(block) == labels.LABEL_BYTES and labels.Label.decode(block) == lab
    damaged = bytearray(block)
    damaged[40] ^= 0xFF
    assert labels.Label.decode(bytes(damaged)) is None
    assert labels.Label.decode(bytes(labels.LABEL_BYTES)) is None
    dev = tmp_path / "dev"
    with open(dev, "wb") as f:
        f.truncate(8 * MIB)
    assert labels.read(str(dev), 8 * MIB) is None and labels.label_area_is_blank(str(dev), 8 * MIB)
    labels.write(str(dev), 8 * MIB, lab)
    assert labels.read(str(dev), 8 * MIB) == lab
    assert labels.usable_bytes(8 * MIB) == 7 * MIB


# --- manage mode: the create-ns path ---------------------------------------------------
def test_create_makes_attaches_and_labels_a_namespace(rig):
    backend = opened(rig())
    drive = drive_of(backend)
    backing = backend.create("vol-a", 64 * MIB, access_types=("block",))
    assert backing.pool_name == "nsid-1" and backing.sector_size_bytes == 4096
    (create,) = [c for c in drive.calls if c[1] == "create-ns"]
    # the volume and its label area; the 4096-byte format without metadata (index 4)
    assert f"--nsze={(64 * MIB + labels.LABEL_AREA_BYTES) // 4096}" in create
    assert "--flbas=4" in create
    assert drive.attached == {1}
    (dev,) = backend.devices(backing)
    assert labels.read(dev.path, dev.size_bytes).volume_id == "vol-a"
    assert backend.filesystem_bytes(backing) == 64 * MIB
    # idempotent by name: no second namespace; another size is ALREADY_EXISTS
    assert backend.create("vol-a", 64 * MIB, access_types=("block",)) == backing
    assert len([c for c in drive.calls if c[1] == "create-ns"]) == 1
    with pytest.raises(AlreadyExists):
        backend.create("vol-a", 128 * MIB)


def test_delete_detaches_and_deletes_and_repeats_cleanly(rig):
    backend = opened(rig())
    drive = drive_of(backend)
    backend.create("vol-a", 16 * MIB)
    backend.delete("vol-a")
    backend.delete("vol-a")
    assert drive.namespaces == {} and drive.attached == set()
    assert backend.get("vol-a") is None and backend.ns_records() == []
    deletes = [c for c in drive.calls if c[1] == "delete-ns"]
    assert deletes == [["nvme", "delete-ns", "/dev/nvme0", "--namespace-id=1"]]


def test_a_create_that_fails_after_create_ns_leaves_nothing(rig):
    backend = opened(rig())
    drive = drive_of(backend)
    drive.fail["attach-ns"] = QEMU["attach-ns-bad-controller"]
    with pytest.raises(Precondition, match="controller ID"):
        backend.create("vol-a", 16 * MIB)
    assert drive.namespaces == {} and backend.get("vol-a") is None
    assert backend.ns_records() == []


def test_capacity_comes_from_the_controller(rig):
    drive = FakeDrive(unallocated=64 * MIB)
    backend = opened(rig(drive))
    usage = backend.usage()
    assert usage.total_bytes == int(DRIVE["id-ctrl-overrides"]["tnvmcap"])
    assert usage.free_bytes == 64 * MIB and usage.reserve_bytes == 0
    backend.create("vol-a", 32 * MIB)
    # free counts our own volumes back in: the control plane subtracts them as provisioned
    assert backend.usage().free_bytes == 64 * MIB - labels.LABEL_AREA_BYTES
    with pytest.raises(OutOfCapacity, match="unallocated"):
        backend.create("vol-b", 64 * MIB)
    assert len([c for c in drive.calls if c[1] == "create-ns"]) == 1  # refused before
    drive.unallocated = 1 << 40  # the controller says no all the same: its answer counts
    drive.fail["create-ns"] = DRIVE["create-ns-insufficient-capacity"]
    with pytest.raises(OutOfCapacity):
        backend.create("vol-b", 64 * MIB)


def test_max_volumes_from_the_controllers_namespace_limit(rig):
    drive = FakeDrive(namespaces={7: 4096}, attached={7})  # someone else's namespace
    backend = opened(rig(drive))
    # MNAN 16 of NN 32, less the namespace that is not ours
    assert backend.max_volumes() == 16 - 1
    assert drive.attached == {7} and 7 in drive.namespaces  # left alone


def test_controllers_without_namespace_management_are_refused_at_start_up(rig):
    qemu = rig(FakeDrive(ns_management=False))
    with pytest.raises(Precondition, match="Invalid Command Opcode.*--nvme-namespaces pool"):
        qemu.open()
    backend = rig(FakeDrive())
    original = drive_of(backend)

    def no_oacs(argv, **kw):
        done = original(argv, **kw)
        if argv[1] == "id-ctrl":
            doc = json.loads(done.stdout)
            doc["oacs"] = 0
            done = subprocess.CompletedProcess(argv, 0, json.dumps(doc), "")
        return done

    backend.cli.runner = no_oacs
    with pytest.raises(Precondition, match="OACS bit 3 clear"):
        backend.open()


def test_lost_store_is_rebuilt_from_labels_and_nothing_is_deleted(rig):
    drive = FakeDrive()
    first = opened(rig(drive))
    first.create("vol-a", 16 * MIB, access_types=("mount",))
    drive.namespaces[9] = 4096  # someone else's namespace, attached, no label
    drive.attached.add(9)
    again = opened(rig(drive, store_name="new.sqlite"))
    backing = again.get("vol-a")
    assert backing is not None and backing.size_bytes == 16 * MIB
    assert backing.access_types == ("mount",) and backing.pool_name == "nsid-1"
    assert again.orphans == []  # its record is back; the cluster decides if it is wanted
    assert again.ns_record(9) is None
    assert 9 in drive.namespaces and 9 in drive.attached
    assert [c for c in drive.calls if c[1] in ("delete-ns", "detach-ns")] == []


def test_a_namespace_re_created_behind_our_back_is_never_used_or_deleted(rig):
    backend = opened(rig())
    backing = backend.create("vol-a", 16 * MIB)
    sysfs = backend.sysfs
    assert isinstance(sysfs, FakeSysfs)
    sysfs.generation[1] = 1  # same NSID, another namespace
    with pytest.raises(Precondition, match="re-created"):
        backend.devices(backing)
    assert "re-created" in backend.storage_missing(backing)
    with pytest.raises(Precondition, match="not deleted"):
        backend.delete("vol-a")
    assert 1 in drive_of(backend).namespaces


def test_a_namespace_gone_from_the_controller_is_reported(rig):
    backend = opened(rig())
    backing = backend.create("vol-a", 16 * MIB)
    drive_of(backend).attached.clear()
    assert "not attached" in backend.storage_missing(backing)


def test_what_namespaces_cannot_do_is_a_precondition(rig):
    backend = opened(rig())
    backing = backend.create("vol-a", 16 * MIB)
    for call in (lambda: backend.create("c", 16 * MIB, clone_from=backing),
                 lambda: backend.check_copy_on_write("a snapshot"),
                 lambda: backend.make_snapshots(None, None, None).create("s", "vol-a"),
                 lambda: backend.expand("vol-a", 32 * MIB),
                 backend.replica_directory):
        with pytest.raises(Precondition) as e:
            call()
        assert code_for(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert backend.expand("vol-a", 16 * MIB) == backing  # the same size: a no-op


# --- pool mode (what QEMU runs for real in the guest) -----------------------------------
def test_pool_claims_the_smallest_fit_and_wipes_before_reuse(rig, monkeypatch):
    drive = FakeDrive(ns_management=False, namespaces={1: 8192, 2: 4096, 3: 16384})
    backend = opened(rig(drive, namespaces=nvme.POOL, pool_nsids=(1, 2, 3)))
    assert drive.attached == set()  # adopted as blank, detached again
    assert {r.nsid: r.state for r in backend.ns_records()} == {1: "dirty", 2: "dirty",
                                                              3: "dirty"}
    wiped = []
    monkeypatch.setattr(backend, "_wipe", lambda rec, dev: wiped.append(rec.nsid))
    backing = backend.create("vol-a", 16 * MIB)  # NSID 2 (16 MiB) holds 15 MiB: NSID 1
    assert backing.pool_name == "nsid-1" and wiped == [1]
    backend.delete("vol-a")
    assert wiped == [1, 1] and drive.attached == set()
    assert backend.ns_record(1).state == "free"
    backend.create("vol-b", 16 * MIB)
    assert wiped == [1, 1]  # wiped at delete, labelled free: not again
    with pytest.raises(OutOfCapacity, match="no free pre-created namespace"):
        backend.create("vol-c", 80 * MIB)
    assert backend.max_volumes() == 3


def test_pool_namespace_with_foreign_data_is_left_alone(rig):
    drive = FakeDrive(ns_management=False, namespaces={1: 4096})
    backend = rig(drive, namespaces=nvme.POOL, pool_nsids=(1,))
    backend.open()
    # someone's data in the label area: not Tandem's, never wiped
    drive.attached.add(1)
    (dev,) = backend.sysfs.namespaces(NQN)
    with open(dev.path, "r+b") as f:
        f.seek(dev.size_bytes - 4096)
        f.write(b"someone else's bytes")
    drive.attached.discard(1)
    backend.reconcile()
    assert backend.foreign == [1] and backend.ns_record(1) is None
    assert drive.attached == set()


def test_parse_nsids():
    assert parse_nsids("1-4,7, 9") == (1, 2, 3, 4, 7, 9)
    for bad in ("0", "4-2", "x"):
        with pytest.raises(InvalidSpec):
            parse_nsids(bad)


def test_config_is_checked():
    with pytest.raises(InvalidSpec, match="pool-nsids"):
        nvme.NvmeConfig(NQN, namespaces=nvme.POOL).check()
    with pytest.raises(InvalidSpec, match="subsystem"):
        nvme.NvmeConfig("").check()
    assert VolumePolicy().max_volumes_per_node == 128


def test_concurrent_creates_never_claim_the_same_namespace(rig, monkeypatch):
    """Each create holds only its own volume's lock: two at once must still take two
    namespaces (the read of the free ones and the claim are one step)."""
    import threading
    import time

    drive = FakeDrive(ns_management=False, namespaces={1: 8192, 2: 8192})
    backend = opened(rig(drive, namespaces=nvme.POOL, pool_nsids=(1, 2)))
    monkeypatch.setattr(backend, "_wipe", lambda rec, dev: None)
    monkeypatch.setattr(backend, "_finish", lambda backing: None)
    real = backend.ns_records

    def slow_records():
        found = real()
        time.sleep(0.05)  # both creates read the free list before either claims
        return found

    monkeypatch.setattr(backend, "ns_records", slow_records)
    made, errors = [], []

    def create(name):
        try:
            made.append(backend.create(name, 16 * MIB).pool_name)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=create, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(made) == ["nsid-1", "nsid-2"]


def test_iops_are_measured_only_on_the_namespace_reserved_for_it(rig, monkeypatch):
    """The capacity for guaranteed minima is measured on a namespace kept for it, never
    one that holds or may hold a volume (fio writes: it would destroy a tenant's data)."""
    runs: list[str] = []
    monkeypatch.setattr(nvme.fio, "run", lambda job: (runs.append(job.filename),
                                                       SimpleNamespace(iops=12345.0))[1])
    drive = FakeDrive()  # one drive and one sysfs for every backend of this test
    with pytest.raises(Precondition, match="--nvme-measure-nsid"):
        opened(rig(drive)).measure_iops()  # none reserved: refused, saying what to give
    # namespace 1 holds a volume: refused as the measurement's, and left alone
    backend = opened(rig(drive, store_name="a.sqlite", measure_nsid=1))
    assert backend.create("vol-a", 16 * MIB).pool_name == "nsid-1"
    with pytest.raises(Precondition, match="holds or may hold a volume"):
        backend.measure_iops()
    assert runs == []
    # namespace 2 carries another node's volume label: refused as well
    drive.namespaces[2] = 8192
    other = opened(rig(drive, store_name="b.sqlite", measure_nsid=2))
    dev = other._attach_device(2, 8192 * 4096)
    labels.write(dev.path, dev.size_bytes, labels.Label(labels.VOLUME, volume_id="vol-x",
                                                        node_id="n9"))
    other._detach(2)
    with pytest.raises(Precondition, match="labelled volume vol-x"):
        other.measure_iops()
    assert runs == []
    # a blank namespace reserved for it: measured there, and detached again
    drive.namespaces[3] = 8192
    third = opened(rig(drive, store_name="c.sqlite", measure_nsid=3))
    assert third.measure_iops() == 12345
    (measured,) = runs
    assert os.path.basename(measured) == third.sysfs.names[3]  # type: ignore[attr-defined]
    assert 3 not in drive.attached
    assert third.measure_iops() == 12345  # its own label does not stop a second run
