"""NVMe status codes as nvme-cli reports them, and the domain error each one means.

nvme-cli 2.x prints a failed admin command as
`NVMe status: Namespace Already Attached: ...(0x4118)` on stderr and exits 1 (1.x exited
with the status itself, truncated to 8 bits). The value in parentheses is the status
field: bits 7:0 the Status Code (SC), bits 10:8 the Status Code Type (SCT: 0 generic,
1 command specific), bit 14 Do Not Retry. The SCT/SC pair is what means something;
which domain error it becomes also depends on the command (an Invalid Field in an
attach is a missing namespace, in a create an LBA format or size the drive refuses).

Every failure turns into a domain error (engine/errors.py) whose message says what
failed, what the drive answered, and what a person can do about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import (
    AlreadyExists,
    Busy,
    CommandFailed,
    EngineError,
    InvalidSpec,
    NotFound,
    OutOfCapacity,
    Precondition,
    Unavailable,
)

GENERIC, COMMAND_SPECIFIC, MEDIA, PATH = 0, 1, 2, 3
_STATUS = re.compile(r"NVMe status: (?P<text>[^\n]*?)\(0x(?P<hex>[0-9a-fA-F]+)\)")
DNR_BIT = 0x4000


@dataclass(frozen=True)
class NvmeStatus:
    sct: int
    sc: int
    dnr: bool = False
    text: str = ""

    @classmethod
    def from_value(cls, value: int, text: str = "") -> NvmeStatus:
        return cls((value >> 8) & 0x7, value & 0xFF, bool(value & DNR_BIT), text)

    @property
    def key(self) -> tuple[int, int]:
        return self.sct, self.sc

    def __str__(self) -> str:
        return f"SCT {self.sct:#x} SC {self.sc:#04x}{': ' + self.text if self.text else ''}"


# (SCT, SC) pairs we act on by name
INVALID_OPCODE = (GENERIC, 0x01)
INVALID_FIELD = (GENERIC, 0x02)
DATA_TRANSFER_ERROR = (GENERIC, 0x04)
INTERNAL_ERROR = (GENERIC, 0x06)
ABORT_REQUESTED = (GENERIC, 0x07)
INVALID_NAMESPACE = (GENERIC, 0x0B)
SANITIZE_IN_PROGRESS = (GENERIC, 0x1D)
NAMESPACE_WRITE_PROTECTED = (GENERIC, 0x20)
NAMESPACE_NOT_READY = (GENERIC, 0x82)
INVALID_FORMAT = (COMMAND_SPECIFIC, 0x0A)
NS_INSUFFICIENT_CAPACITY = (COMMAND_SPECIFIC, 0x15)
NS_ID_UNAVAILABLE = (COMMAND_SPECIFIC, 0x16)
NS_ALREADY_ATTACHED = (COMMAND_SPECIFIC, 0x18)
NS_IS_PRIVATE = (COMMAND_SPECIFIC, 0x19)
NS_NOT_ATTACHED = (COMMAND_SPECIFIC, 0x1A)
THIN_PROVISIONING_UNSUPPORTED = (COMMAND_SPECIFIC, 0x1B)
CONTROLLER_LIST_INVALID = (COMMAND_SPECIFIC, 0x1C)
NS_ATTACHMENT_LIMIT = (COMMAND_SPECIFIC, 0x27)


def parse_status(stderr: str, returncode: int = 0) -> NvmeStatus | None:
    """The NVMe status of a failed nvme-cli call, None when the failure was not the
    drive's answer (no such device, a bad option, a timeout)."""
    m = _STATUS.search(stderr)
    if m is None:
        return None
    return NvmeStatus.from_value(int(m.group("hex"), 16), m.group("text").strip(" :"))


class NvmeFailed(CommandFailed):
    """A failed nvme-cli call, kept with its NVMe status (None: not the drive's answer).
    Raised as a subclass of the domain error it means (see classify)."""

    status: NvmeStatus | None = None


_CLASSES: dict[type[EngineError], type[NvmeFailed]] = {}


def _failure_class(domain: type[EngineError]) -> type[NvmeFailed]:
    """NvmeFailed mixed with a domain error: the one translator maps it by the domain
    class, callers still see the status and the command's output."""
    if domain not in _CLASSES:
        _CLASSES[domain] = type(f"Nvme{domain.__name__}", (NvmeFailed, domain), {})
    return _CLASSES[domain]


def _domain_and_advice(command: str, status: NvmeStatus) -> tuple[type[EngineError], str]:
    key = status.key
    if key == INVALID_OPCODE:
        return Precondition, (
            f"the controller does not implement {command} (QEMU's emulated controller, and "
            "many drives, advertise Namespace Management yet reject it); serve this node "
            "from pre-created namespaces instead (--nvme-namespaces pool)")
    if key == INVALID_FIELD:
        if command == "create-ns":
            return InvalidSpec, ("the controller refused the namespace's size or LBA format; "
                                 "check --nvme-sector-size against `nvme id-ns -f`")
        return NotFound, ("the controller knows no such namespace or controller ID; the "
                          "namespace may have been deleted behind the driver's back")
    if key == INVALID_NAMESPACE:
        return NotFound, "the namespace does not exist (or its format is invalid)"
    if key in (NS_INSUFFICIENT_CAPACITY,):
        return OutOfCapacity, "the controller has no unallocated capacity left for it"
    if key in (NS_ID_UNAVAILABLE, NS_ATTACHMENT_LIMIT):
        return OutOfCapacity, ("the controller holds as many namespaces as it can; delete "
                               "unused ones")
    if key == NS_ALREADY_ATTACHED:
        return AlreadyExists, "the namespace is already attached to that controller"
    if key == NS_NOT_ATTACHED:
        return NotFound, "the namespace is not attached to that controller"
    if key == NS_IS_PRIVATE:
        return Precondition, ("the namespace is private to another controller; detach it "
                              "there or make it shared")
    if key == CONTROLLER_LIST_INVALID:
        return Precondition, ("the controller ID is not one of the subsystem's; check "
                              "`nvme list-ctrl` and --nvme-subsystem")
    if key in (INVALID_FORMAT, THIN_PROVISIONING_UNSUPPORTED):
        return InvalidSpec, "the controller does not support the format or provisioning asked"
    if key == NAMESPACE_WRITE_PROTECTED:
        return Precondition, "the namespace is write protected; clear its write protection"
    if key in (SANITIZE_IN_PROGRESS, NAMESPACE_NOT_READY, ABORT_REQUESTED):
        return Busy, "the drive is busy (sanitize, reset or abort under way); retry"
    if key in (DATA_TRANSFER_ERROR, INTERNAL_ERROR):
        return Unavailable, "the drive reported an internal or transfer error; check its health"
    return Unavailable, "an NVMe status this driver does not know; see the drive's documentation"


def classify(command: str, argv: list[str], returncode: int, stdout: str,
             stderr: str) -> NvmeFailed:
    """The domain error a failed nvme-cli call means (not raised: returned)."""
    status = parse_status(stderr, returncode)
    if status is None:
        # not the drive's answer: nvme-cli or the kernel refused before (no device node,
        # a wrong ioctl for this device, permissions) or it timed out
        detail = (stderr or stdout).strip().splitlines()
        first = detail[0] if detail else f"exit {returncode}"
        cls: type[EngineError]
        if "No such file or directory" in stderr:
            cls, advice = NotFound, "the controller's device node is gone (reset or removed?)"
        elif returncode == 127:
            cls, advice = Precondition, "nvme-cli is not installed (Debian package nvme-cli)"
        else:
            cls, advice = Unavailable, "nvme-cli failed before the drive answered"
        err = _failure_class(cls)(argv, returncode, stdout, stderr)
        err.args = (f"nvme {command} failed: {first}; {advice}",)
        return err
    cls, advice = _domain_and_advice(command, status)
    err = _failure_class(cls)(argv, returncode, stdout, stderr)
    err.status = status
    err.args = (f"nvme {command} ({' '.join(argv[2:])}): the drive answered {status}; "
                f"{advice}",)
    return err
