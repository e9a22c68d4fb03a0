"""The single translator between domain errors and gRPC status codes.

Handlers raise domain errors (engine/errors.py); this module maps them, for the CSI
services and for the node agent's API alike. Anything unexpected is logged with its
traceback and returned as INTERNAL. Handlers never pick or set codes themselves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from engine import errors

log = logging.getLogger(__name__)


CODES: dict[type[Exception], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidSpec: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.OutOfCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InUse: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Precondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Busy: grpc.StatusCode.ABORTED,
    errors.InvalidToken: grpc.StatusCode.ABORTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
# The way back, for the node agent's client: a status from a remote node becomes the
# domain error it was raised as (the most general class of each code).
ERRORS: dict[grpc.StatusCode, type[errors.EngineError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidSpec,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.OutOfCapacity,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Precondition,
    grpc.StatusCode.ABORTED: errors.Busy,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
}


def code_for(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, OSError) and isinstance(exc, errors.EngineError):
        by_errno = errors.class_for_errno(exc.errno)  # a replica's or the kernel's answer
        if by_errno is not None:
            return CODES[next(c for c in by_errno.__mro__ if c in CODES)]
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return None


# Trailing metadata naming the domain error's class: a remote node's StaleVersion or InUse
# comes back as itself, not only as the most general class of its code.
ERROR_KEY = "tandem-error"


def error_for(code: grpc.StatusCode, message: str, kind: str = "") -> errors.EngineError:
    """A status a remote node answered with, as the domain error it was raised as: the
    class `kind` names (from the status's trailing metadata) when it is a domain error of
    that very code, else the most general class of the code."""
    named = getattr(errors, kind, None) if kind else None
    if (isinstance(named, type) and issubclass(named, errors.EngineError)
            and next((CODES[c] for c in named.__mro__ if c in CODES), None) == code):
        return named(message)
    cls = ERRORS.get(code)
    if cls is None:
        return errors.EngineError(f"{code.name}: {message}")
    return cls(message)


def error_kind(metadata: Any) -> str:
    """The domain error's class name in a status's trailing metadata ('' if none)."""
    for key, value in metadata or ():
        if key == ERROR_KEY:
            return str(value)
    return ""


def _abort(context: grpc.ServicerContext, name: str, exc: Exception) -> None:
    code = code_for(exc)
    if code is None:
        log.exception("%s failed unexpectedly", name)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    else:
        log.info("%s: %s: %s", name, code.name, exc)
        context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
        context.abort(code, str(exc))


def translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method: domain errors become their status codes."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps all
            _abort(context, method.__name__, exc)

    return wrapper


def translated_stream(method: Callable[..., Any]) -> Callable[..., Any]:
    """The same translation for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, method.__name__, exc)

    return wrapper
