"""Domain errors raised by the engine (and the mirror).

No gRPC here: the CSI layer translates these in one place (csi/errors.py).
"""

from __future__ import annotations

import errno


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class NotFound(EngineError):
    pass


class AlreadyExists(EngineError):
    pass


class InvalidSpec(EngineError):
    """The request is malformed or asks for something impossible."""


class OutOfRange(EngineError):
    """A size or count outside what can be satisfied (CSI OUT_OF_RANGE)."""


class OutOfCapacity(EngineError):
    """Not enough room (pool bytes, guaranteed IOPS, attach slots): may succeed later."""


class InUse(EngineError):
    """The object is held by something else (published elsewhere, has dependants)."""


class Precondition(EngineError):
    """The request is well-formed, but the node's state forbids it: a path of the wrong type,
    a device whose data a format would destroy, a device still held open (CSI
    FAILED_PRECONDITION). The message says what must change first."""


class Busy(EngineError):
    """Another operation on the same object is under way: retry later (CSI ABORTED)."""


class OperationPending(Busy):
    """This process already runs an operation on the same name or ID (the lock table's
    refusal, as opposed to a node's or a device's Busy)."""


class StaleVersion(Busy):
    """The call acts on an older cluster record than the node already acted on: the
    caller re-reads the record and retries (ABORTED)."""


class InvalidToken(EngineError):
    """A paging token this driver did not make (CSI ABORTED: the CO restarts the list)."""


class DataLoss(EngineError):
    """Data that should exist cannot be read back intact (CSI DATA_LOSS)."""


class Unavailable(EngineError):
    """A dependency (arbiter, replica, device) cannot be reached right now."""


class CommandFailed(EngineError):
    """An external command exited non-zero or timed out; keeps its output for the log."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout).strip().splitlines()[-3:]
        super().__init__(f"{argv[0]} exited {returncode}: {' | '.join(tail)}")


# What an errno means in the terms above: one table, used where the kernel or a replica
# answers with an errno (the mirror's replica statuses, filesystem calls) and by the
# translator to gRPC codes for errors that carry an errno.
ERRNO_ERRORS: dict[int, type[EngineError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EINVAL: InvalidSpec,
    errno.EFBIG: OutOfRange,
    errno.ENOSPC: OutOfCapacity,
    errno.EDQUOT: OutOfCapacity,
    errno.EBUSY: InUse,
    errno.EAGAIN: Busy,
    errno.ESTALE: StaleVersion,  # fenced by a newer generation
    errno.EIO: Unavailable,
    errno.ETIMEDOUT: Unavailable,
    errno.ECONNREFUSED: Unavailable,
    errno.ECONNRESET: Unavailable,
    errno.EHOSTUNREACH: Unavailable,
    errno.EPIPE: Unavailable,
}


def class_for_errno(err: int | None) -> type[EngineError] | None:
    return ERRNO_ERRORS.get(err or 0)
