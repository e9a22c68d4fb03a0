"""Mounts: read /proc/self/mountinfo, and mount, bind, remount and unmount.

Operations converge on the kernel's table rather than on our records, so repeating
one (an idempotent CSI retry) never stacks a second mount.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engine import command, crash
from engine.errors import CommandFailed, InUse

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # path inside the source filesystem (a bind mount of a file shows it here)
    target: str
    options: frozenset[str]
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


class _DeviceLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def major(self) -> int: ...

    @property
    def minor(self) -> int: ...


def is_device_bind(entry: MountEntry, dev: _DeviceLike) -> bool:
    """A bind mount of dev's device node (a block publish)."""
    return entry.root == f"/{dev.name}" or entry.source == dev.path


def mounts_device(entry: MountEntry | None, dev: _DeviceLike) -> bool:
    """A mount of a filesystem on dev."""
    return entry is not None and (entry.major, entry.minor) == (dev.major, dev.minor)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 3:
            continue
        major, minor = (int(x) for x in f[2].split(":"))
        entries.append(
            MountEntry(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                major=major,
                minor=minor,
                root=_unescape(f[3]),
                target=_unescape(f[4]),
                options=frozenset(f[5].split(",")),
                fs_type=r[0],
                source=_unescape(r[1]),
                super_options=frozenset(r[2].split(",")),
            )
        )
    return entries


class Mounts:
    def __init__(self, mountinfo_path: str = "/proc/self/mountinfo"):
        self.mountinfo_path = mountinfo_path

    def table(self) -> list[MountEntry]:
        with open(self.mountinfo_path, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())

    def at(self, target: str) -> list[MountEntry]:
        """Mounts stacked on `target`, oldest first."""
        target = os.path.normpath(target)
        return [m for m in self.table() if m.target == target]

    def is_mounted(self, target: str) -> bool:
        return bool(self.at(target))

    def of_device(self, major: int, minor: int) -> list[MountEntry]:
        return [m for m in self.table() if (m.major, m.minor) == (major, minor)]

    def mount(self, source: str, target: str, fs_type: str, options: list[str]) -> None:
        argv = ["mount", "-t", fs_type]
        if options:
            argv += ["-o", ",".join(options)]
        command.run(argv + [source, target])

    def bind(self, source: str, target: str, *, read_only: bool,
             options: Sequence[str] = ()) -> None:
        """Bind-mount; read-only needs a remount, since the kernel ignores ro on the bind itself.
        All or nothing: a failed remount takes the bind off again (never a writable
        mount where a read-only one was asked for)."""
        command.run(["mount", "--bind", source, target])
        extra = [o for o in options if o not in ("bind", "ro", "rw")]
        if read_only or extra:
            flags = ["remount", "bind"] + (["ro"] if read_only else []) + extra
            try:
                crash.point("bind-before-remount")
                command.run(["mount", "-o", ",".join(flags), target])
            except BaseException:
                command.run(["umount", target], check=False)
                raise

    def unmount(self, target: str) -> None:
        """Unmount everything stacked on target; nothing mounted is fine. A busy mount
        (open files, or held in a peer mount namespace) is InUse."""
        while self.is_mounted(target):
            try:
                command.run(["umount", target])
            except CommandFailed as e:
                if "busy" in e.stderr:
                    raise InUse(f"{target} is busy (files open on it): {e.stderr.strip()}") \
                        from None
                raise
