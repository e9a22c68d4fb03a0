"""The image (deploy/Dockerfile) holds what the driver runs and what building it needs.

No Docker engine runs here, so the Dockerfile is parsed: its stages and the Debian packages
each installs. The commands the code runs are found in the code itself: every call of
engine/command.py's run() in engine/, mirror/, control/ and csi/, resolved to its argv's
first word (a list literal, or one built in a variable or method named argv). A call whose
command cannot be resolved fails the test, so a new command cannot slip by.
"""

from __future__ import annotations

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("engine", "mirror", "control", "csi")
TEST_HELPERS = {"mirror/testkit.py"}  # namespaces for tests, never run by the driver

# Debian bookworm: which package gives each command (dpkg -S).
PACKAGE_OF = {
    "mount": "mount", "umount": "mount", "losetup": "mount",
    "blkid": "util-linux",
    "mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs", "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs", "xfs_io": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs", "btrfs": "btrfs-progs",
    "fio": "fio",
    "nvme": "nvme-cli",
    "ip": "iproute2",
    "modprobe": "kmod",
    "fusermount3": "fuse3",
}
# What the issue asks the image to carry whatever the code calls today: the mirror's FUSE
# frontend (fuse3), the NVMe backend (nvme-cli), fio (the pool's IOPS unless configured).
REQUIRED_RUNTIME = {"python3", "util-linux", "mount", "e2fsprogs", "xfsprogs", "btrfs-progs",
                    "fio", "fuse3", "nvme-cli"}
REQUIRED_BUILD = {"gcc", "python3-dev", "python3-venv", "libc6-dev"}  # mirror/_fastpath.c


# -- the Dockerfile ----------------------------------------------------------------------------
def stages() -> list[dict]:
    """[{"from": image, "name": alias, "packages": set, "lines": [...]}, ...]"""
    with open(os.path.join(REPO, "deploy", "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())  # join continued lines
    out: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            out.append({"from": parts[0], "name": parts[2] if len(parts) > 2 else "",
                        "packages": set(), "lines": []})
            continue
        out[-1]["lines"].append(line)
        for install in re.findall(r"apt-get install ([^&;]+)", rest):
            out[-1]["packages"] |= {w for w in install.split() if not w.startswith("-")}
    return out


def test_the_build_stage_can_compile_the_c_extension():
    build = stages()[0]
    assert build["packages"] >= REQUIRED_BUILD
    assert any("import mirror._fastpath" in line for line in build["lines"])  # built, loads


def test_the_runtime_stage_has_the_venv_and_no_compiler():
    runtime = stages()[-1]
    assert runtime["from"] == stages()[0]["from"]  # same Python: the venv moves across
    assert any(re.match(r"COPY --from=\w+ /opt/tandem /opt/tandem", x) for x in runtime["lines"])
    assert runtime["packages"] >= REQUIRED_RUNTIME
    assert not {"gcc", "python3-dev"} & runtime["packages"]
    assert runtime["lines"][-1] == 'ENTRYPOINT ["/opt/tandem/bin/tandem-csi"]'


# -- the commands the code runs ----------------------------------------------------------------
def _first_word(node: ast.AST) -> str | None:
    if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant) \
            and isinstance(node.elts[0].value, str):
        return node.elts[0].value
    return None


def _argv_lists(tree: ast.AST) -> dict[str, set[str]]:
    """Commands of list literals assigned to a name, per name, and of `argv` methods."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            word = _first_word(node.value)
            for target in node.targets:
                if word and isinstance(target, ast.Name):
                    found.setdefault(target.id, set()).add(word)
        if isinstance(node, ast.FunctionDef) and node.name == "argv":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and _first_word(sub.value):
                    found.setdefault("argv()", set()).add(_first_word(sub.value))
    return found


def commands_run() -> tuple[dict[str, set[str]], list[str]]:
    """{command: {where}} of every command.run call, and the calls not resolved."""
    found: dict[str, set[str]] = {}
    unresolved = []
    for package in SOURCES:
        for path in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, REPO)
            if rel in TEST_HELPERS:
                continue
            with open(path) as f:
                tree = ast.parse(f.read())
            lists = _argv_lists(tree)
            # argv() methods anywhere in the package (fio.py's FioJob.argv)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "run" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "command" and node.args):
                    continue
                arg = node.args[0]
                words: set[str] = set()
                if _first_word(arg):
                    words = {_first_word(arg)}
                elif isinstance(arg, ast.BinOp) and _first_word(arg.left):
                    words = {_first_word(arg.left)}
                elif isinstance(arg, ast.BinOp | ast.Name):
                    name = arg.left.id if isinstance(arg, ast.BinOp) and \
                        isinstance(arg.left, ast.Name) else getattr(arg, "id", "")
                    words = lists.get(name, set()) or lists.get("argv()", set())
                if not words:
                    unresolved.append(f"{rel}:{node.lineno}")
                for w in words:
                    found.setdefault(w, set()).add(f"{rel}:{node.lineno}")
    return found, unresolved


def test_every_command_the_code_runs_is_in_the_image():
    found, unresolved = commands_run()
    assert not unresolved, f"command.run calls whose command is not known: {unresolved}"
    assert {"losetup", "mount", "umount", "mkfs.ext4", "mkfs.xfs", "fio", "blkid"} <= set(found)
    runtime = stages()[-1]["packages"]
    missing = {cmd: where for cmd, where in found.items()
               if PACKAGE_OF.get(cmd) not in runtime}
    assert not missing, f"commands without their package in the image: {missing}"
