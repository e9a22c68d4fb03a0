"""How a volume is accessed: its access types and the filesystems a mount volume may
carry. Plain values, so the controller side can check a request without a node."""

from __future__ import annotations

from engine.errors import InvalidSpec

MOUNT, BLOCK = "mount", "block"
SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"


def check_fs_type(fs_type: str) -> str:
    fs_type = fs_type or DEFAULT_FS
    if fs_type not in SUPPORTED_FS:
        raise InvalidSpec(f"filesystem {fs_type!r} is not supported (use one of {SUPPORTED_FS})")
    return fs_type
