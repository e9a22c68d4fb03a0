"""The arrows between the packages point one way (docs/architecture.md), read from the
source's import statements:

- engine/ and mirror/ know no CSI, no gRPC, no control plane;
- the node API and the controller side of CSI reach a node only through the node API:
  from engine/ they take plain values (errors, access types, tiers, backup names and
  formats) and node-free tools (crash points, key locks, a bucket's repository), never the
  engine's working parts (pool, volumes, snapshots, devices, its store);
- CSI handlers never pick a gRPC code: csi/errors.py is the one translator.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# engine modules that need no node: plain values, and tools any process uses
ENGINE_VALUES = {"engine.errors", "engine.access", "engine.qos.tiers", "engine.backup.targets",
                 "engine.backup.manifest",
                 "engine.crash", "engine.locks",  # named crash points, in-process key locks
                 "engine.backup.repo"}  # a bucket's backups: the bucket is no node's
CONTROLLER_SIDE = ["control/node_api.py", "csi/controller.py", "csi/snapshotter.py",
                   "csi/snapshot_metadata.py", "csi/group_controller.py", "csi/validation.py",
                   "csi/idempotency.py", "control/volumes.py", "control/snapshots.py",
                   "control/placement.py", "control/policy.py", "control/registry.py",
                   "control/mirrored.py", "control/backups.py",
                   "control/replica_report.py", "csi/admin_replicas.py"]


def is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: pathlib.Path) -> set[str]:
    """Every module path.py imports, at any depth of the file (lazy imports included):
    `from a.b import c` counts as a.b.c where c is a module, else as a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["engine", "mirror"])
def test_engine_and_mirror_know_no_csi_grpc_or_control_plane(package):
    offenders = {f"{path.relative_to(ROOT)}: {name}"
                 for path in modules(package) for name in imports(path)
                 if top(name) in ("csi", "control", "grpc", "proto")}
    assert not offenders, sorted(offenders)


@pytest.mark.parametrize("module", CONTROLLER_SIDE)
def test_the_controller_side_takes_only_plain_values_from_the_engine(module):
    working_parts = {name for name in imports(ROOT / module)
                     if top(name) == "engine" and name not in ENGINE_VALUES}
    assert not working_parts, f"{module} imports engine internals: {sorted(working_parts)}"


def test_the_node_api_imports_no_grpc():
    assert not {n for n in imports(ROOT / "control/node_api.py") if top(n) == "grpc"}


def test_csi_handlers_never_pick_a_grpc_code():
    offenders = [str(path.relative_to(ROOT)) for path in modules("csi")
                 if path.name != "errors.py" and "StatusCode" in path.read_text()]
    assert not offenders, f"status codes chosen outside csi/errors.py: {offenders}"
