"""Request checks shared by the controller and node services.

Required fields are checked before any lookup (the spec's order, and csi-sanity's),
and every string that could reach a path or a command is checked here first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from control import mirrored
from engine.access import BLOCK, MOUNT, check_fs_type
from engine.errors import InvalidSpec, InvalidToken
from engine.qos.tiers import QOS_KEYS
from proto import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode

SUPPORTED_MODES = frozenset({
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
})
READER_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})

# Parameters the sidecars add (pvc/pv names, secrets' names): accepted and ignored.
SIDECAR_PREFIX = "csi.storage.k8s.io/"
VOLUME_PARAMETER_KEYS = QOS_KEYS | mirrored.PARAMETER_KEYS
MUTABLE_PARAMETER_KEYS = QOS_KEYS
MAX_NAME_CHARS = 1024


def require(value: str, what: str) -> str:
    if not value:
        raise InvalidSpec(f"{what} is required")
    if "\0" in value:
        raise InvalidSpec(f"{what} contains a NUL byte")
    return value


def check_name(name: str) -> str:
    require(name, "name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidSpec(f"name is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidSpec("name contains control characters")
    return name


# Trees no volume is ever mounted over or inside, whatever the flags: the node's own
# system. /run is open only inside an --allowed-path-root below it (a kubelet whose root
# directory lives there). Top-level directories named lib* (lib, lib64, libx32...) too.
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/dev", "/proc", "/sys", "/run")


@dataclass(frozen=True)
class PathPolicy:
    """Where staging and target paths may be: never over the node's system trees or the
    driver's own files, and inside allowed_roots when that opt-in is set."""

    allowed_roots: tuple[str, ...] = ()
    # The driver's own state (state dir, pool, socket): a mount at, inside or above one of
    # them hides it from the driver.
    protected: tuple[str, ...] = ()

    @classmethod
    def of(cls, allowed_roots: tuple[str, ...], protected: tuple[str, ...]) -> PathPolicy:
        return cls(tuple(os.path.realpath(r) for r in allowed_roots),
                   tuple(os.path.realpath(p) for p in protected if p))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _forbidden(path: str, policy: PathPolicy) -> str:
    """Why a volume may not be mounted at path ('' when it may)."""
    if path == "/":
        return "is the root directory"
    top = "/" + path.split("/")[1]
    if top in SYSTEM_TREES or top.startswith("/lib"):
        opened = top == "/run" and any(
            _inside(path, r) and r != "/run" and _inside(r, "/run")
            for r in policy.allowed_roots)
        if not opened:
            return f"is in the system tree {top}"
    for own in policy.protected:
        if _inside(path, own):
            return f"is inside the driver's own {own}"
        if _inside(own, path):
            return f"would hide the driver's own {own}"
    return ""


def check_path(path: str, what: str, policy: PathPolicy = PathPolicy()) -> str:
    """The one check of every staging and target path: absolute, no NUL, never over a
    system tree or the driver's own files (nor through a symlink that leads there), inside
    the allowed roots when set. Returns the path with its symlinks resolved, so mounts and
    records name the place the kernel will show."""
    require(path, what)
    if not os.path.isabs(path):
        raise InvalidSpec(f"{what} must be an absolute path, not {path!r}")
    norm = os.path.normpath(path)
    real = os.path.realpath(norm)
    for candidate in dict.fromkeys((norm, real)):
        why = _forbidden(candidate, policy)
        if why:
            leads = f" (it leads to {real})" if candidate != norm else ""
            raise InvalidSpec(f"{what} {path!r}{leads} {why}: refused")
    if policy.allowed_roots and not any(_inside(real, r) for r in policy.allowed_roots):
        raise InvalidSpec(f"{what} {path!r} is outside the allowed roots")
    return real


def access_type(cap: csi_pb2.VolumeCapability) -> str:
    kind = cap.WhichOneof("access_type")
    if kind == "mount":
        return MOUNT
    if kind == "block":
        return BLOCK
    raise InvalidSpec("volume capability has neither mount nor block access type")


def check_capability(cap: csi_pb2.VolumeCapability) -> str:
    """Validate one capability; returns its access type. InvalidArgument if unsupported."""
    kind = access_type(cap)
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        name = Mode.Mode.Name(mode) if mode in Mode.Mode.values() else str(mode)
        raise InvalidSpec(f"access mode {name} is not supported by local volumes")
    if kind == MOUNT:
        try:
            check_fs_type(cap.mount.fs_type)
        except Exception as e:  # InvalidSpec -> same code, clearer context
            raise InvalidSpec(str(e)) from None
        for flag in cap.mount.mount_flags:
            if not flag or "," in flag or "\0" in flag:
                raise InvalidSpec(f"bad mount flag {flag!r}")
    return kind


def check_capabilities(caps) -> list[str]:
    if not caps:
        raise InvalidSpec("volume_capabilities are required")
    return [check_capability(c) for c in caps]


def unsupported_capability(cap: csi_pb2.VolumeCapability) -> str:
    """'' when supported, else why not (for ValidateVolumeCapabilities)."""
    try:
        check_capability(cap)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return ""


def check_parameters(params, allowed: frozenset[str], what: str) -> dict[str, str]:
    """Our keys only; sidecar keys dropped; anything else is INVALID_ARGUMENT."""
    ours = {}
    for key, value in params.items():
        if key.startswith(SIDECAR_PREFIX):
            continue
        if key not in allowed:
            raise InvalidSpec(f"unknown {what} key {key!r} (known: {', '.join(sorted(allowed))})")
        ours[key] = value
    return ours


_ID = re.compile(r"^[a-z]{3,4}-[0-9a-f]{32}$")
TOKEN_PREFIX = "v1."


def well_formed_id(value: str) -> bool:
    return bool(_ID.match(value))


def page_token(last_id: str) -> str:
    """A list's next_token: where the next page starts (after this ID)."""
    return TOKEN_PREFIX + last_id


def page_start(token: str) -> str:
    """The ID a page starts after; ABORTED for any token we did not make (fail closed)."""
    if not token:
        return ""
    after = token[len(TOKEN_PREFIX):]
    if not token.startswith(TOKEN_PREFIX) or not well_formed_id(after):
        raise InvalidToken(f"starting_token {token!r} is not ours")
    return after
