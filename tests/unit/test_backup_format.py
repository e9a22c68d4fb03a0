"""The backup format without a bucket: manifests, range arithmetic, sealing, targets."""

import json
import os

import pytest

from engine.backup.crypto import BadBlob, Keys
from engine.backup.manifest import BlobLocation, Extent, Manifest, without
from engine.backup.targets import Credentials, Targets, parse_snapshot_id
from engine.backup.upload import WINDOW_BYTES, intersect, windows
from engine.errors import InvalidSpec, Precondition

KEY = "k" * 44
MIB = 1024 * 1024


def manifest_of(extents: list[tuple[int, int, bytes, int]], size: int = 64 * MIB) -> Manifest:
    blobs = {b: BlobLocation("ab" * 32, i * 100, 100, 4 * MIB) for i, b in
             enumerate(sorted({e[2] for e in extents}))}
    return Manifest("0" * 32, "vol-x", size, 1.5, "", [Extent(*e) for e in extents], blobs,
                    {"data_bytes": 1})


def test_manifest_round_trip_keeps_every_extent_and_blob():
    a, b = b"a" * 32, b"b" * 32
    m = manifest_of([(0, 4096, a, 0), (8192, 4096, a, 4096), (MIB, 2 * MIB, b, 0)])
    back = Manifest.decode(m.encode())
    assert back.extents == m.extents
    assert back.blobs == m.blobs
    assert (back.backup_id, back.volume_id, back.size_bytes, back.created_at) == \
        ("0" * 32, "vol-x", 64 * MIB, 1.5)
    assert back.data_bytes == 4096 * 2 + 2 * MIB


def test_a_truncated_or_foreign_manifest_is_refused():
    data = manifest_of([(0, 4096, b"a" * 32, 0)]).encode()
    with pytest.raises(ValueError):
        Manifest.decode(data[:-1])
    with pytest.raises(ValueError):
        Manifest.decode(b"something else")


def test_overlapping_extents_are_refused():
    m = manifest_of([(0, 8192, b"a" * 32, 0), (4096, 4096, b"a" * 32, 0)])
    with pytest.raises(ValueError):
        m.check()


def test_without_cuts_changed_ranges_out_of_extents():
    a = b"a" * 32
    extents = [Extent(0, 16384, a, 0), Extent(65536, 4096, a, 16384)]
    kept = without(extents, [(4096, 4096), (12288, 8192), (65536, 4096)])
    assert kept == [Extent(0, 4096, a, 0), Extent(8192, 4096, a, 8192)]
    assert without(extents, []) == extents


def test_intersect_and_windows():
    assert intersect([(0, 10), (20, 10)], [(5, 20)]) == [(5, 5), (20, 5)]
    ranges = [(WINDOW_BYTES - 4096, 8192), (3 * WINDOW_BYTES, 4096)]
    assert list(windows(ranges)) == [(0, [(WINDOW_BYTES - 4096, 4096)]),
                                     (1, [(WINDOW_BYTES, 4096)]),
                                     (3, [(3 * WINDOW_BYTES, 4096)])]


def test_sealed_blobs_open_only_with_their_key_and_name():
    keys = Keys(KEY)
    data = os.urandom(1000) + bytes(100_000)
    sealed = keys.seal(data, b"name")
    assert len(sealed) < len(data)  # the zeros compressed
    assert keys.open(sealed, b"name") == data
    with pytest.raises(BadBlob):
        keys.open(sealed, b"other name")
    with pytest.raises(BadBlob):
        Keys("w" * 44).open(sealed, b"name")
    flipped = bytearray(sealed)
    flipped[40] ^= 1
    with pytest.raises(BadBlob):
        keys.open(bytes(flipped), b"name")
    assert keys.content_id(data) == Keys(KEY).content_id(data) != Keys("w" * 44).content_id(data)


def test_backup_snapshot_ids():
    ref = parse_snapshot_id("bkp:offsite-1:" + "a" * 32)
    assert ref is not None and ref.target == "offsite-1" and ref.backup_id == "a" * 32
    assert len(ref.snapshot_id) <= 128
    for bad in ("snap-" + "a" * 32, "bkp:Off:" + "a" * 32, "bkp:x:" + "a" * 31, "bkp::" + "a" * 32):
        assert parse_snapshot_id(bad) is None


def test_targets_file_and_credentials(tmp_path):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"targets": {"offsite": {
        "endpoint": "https://s3.example:443/", "bucket": "b", "prefix": "/cluster-a/"}}}))
    targets = Targets.load(str(path))
    t = targets.require("offsite")
    assert (t.endpoint, t.bucket, t.prefix) == ("https://s3.example:443", "b", "cluster-a/")
    with pytest.raises(InvalidSpec, match="not known"):
        targets.require("other")
    with pytest.raises(Precondition, match="needs its credentials"):
        targets.resolve("offsite", {}, "DeleteSnapshot")
    secrets = {"accessKeyId": "AK-SENTINEL", "secretAccessKey": "SK-SENTINEL",
               "encryptionKey": "EK-SENTINEL" * 4}
    store = targets.resolve("offsite", secrets, "CreateSnapshot")
    shown = repr(store) + repr(store.credentials)
    assert "SENTINEL" not in shown
    with pytest.raises(InvalidSpec, match="encryptionKey"):
        Credentials.from_secrets({**secrets, "encryptionKey": "short"}, "the secret")
    path.write_text(json.dumps({"targets": {"Bad Name": {"endpoint": "https://x",
                                                         "bucket": "b"}}}))
    with pytest.raises(InvalidSpec):
        Targets.load(str(path))


def test_a_node_sends_data_only_where_its_own_targets_file_says():
    """A job's target (from the controller) is taken as the node's own file defines it:
    the same endpoint, bucket and prefix, or refused; the node's local paths win."""
    from engine.backup.targets import ObjectStore, Target

    node = Targets({"offsite": Target("offsite", "https://s3.example", "b", "cluster-a/",
                                      "eu-west-1", "/etc/tandem/backup/ca.pem")})
    credentials = Credentials("AK", "SK", "k" * 40)
    sent = ObjectStore(Target("offsite", "https://s3.example", "b", "cluster-a/",
                              "us-east-1", "/elsewhere/ca.pem"), credentials)
    used = node.as_here(sent, "node n1")
    assert used.target == node.require("offsite") and used.credentials == credentials
    for other in (Target("offsite", "https://attacker.example", "b", "cluster-a/"),
                  Target("offsite", "https://s3.example", "other-bucket", "cluster-a/"),
                  Target("offsite", "https://s3.example", "b", "")):
        with pytest.raises(Precondition, match="on node n1 but .* for the controller"):
            node.as_here(ObjectStore(other, credentials), "node n1")
    with pytest.raises(Precondition, match="node n1 has no backup target 'second'"):
        node.as_here(ObjectStore(Target("second", "https://s3.example", "b"), credentials),
                     "node n1")
    with pytest.raises(Precondition, match="has no backup target"):
        Targets().as_here(sent, "node n1")  # no targets file: no jobs at all


def test_the_backup_package_imports_neither_csi_control_nor_grpc():
    """engine/backup/ runs on the node beside the rest of the engine: the arrows point
    csi -> control -> engine, never back."""
    import ast
    import glob

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = glob.glob(os.path.join(root, "engine", "backup", "*.py"))
    assert paths
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("csi", "control", "grpc", "proto"), \
                    f"{path} imports {name}"
