"""The cluster store contract: versioned JSON records, guarded all-or-nothing commits, watches.

Records are JSON objects under string keys "kind/name" (see `record_key`). Every record
has a version: the store revision of the commit that last wrote it. Revisions are
store-wide and only grow, so a key deleted and created again never repeats a version,
and "expect version N" can never match a different record (etcd's mod_revision; the
SQLite store keeps the same kind of counter).

Writes go through `commit(ops)`: a list of guarded operations applied all or none.

    Put(key, value, expect=None|0|N)   write; None: unconditional, 0: key must be absent,
                                       N: key must be at version N
    Delete(key, expect=None|N)         remove (absent key with expect=None: no-op)
    Check(key, expect=0|N)             guard only

A failed guard raises `Conflict` naming the keys; nothing is written. `update()` and
`update_many()` are the read-modify-write loops built on that (the Kubernetes API
server's GuaranteedUpdate): read with versions, apply a pure function, commit guarded by
the versions read, retry on Conflict with jittered backoff.

Failures: `Unavailable` when the store cannot be reached (nothing was applied), its
subclass `OutcomeUnknown` when a write was sent but whether it applied could not be
learnt in time (see docs/store.md: stores resolve this themselves whenever the store is
reachable, so callers see it only during an outage). No grpc in this module: the engine
side may use it.
"""

from __future__ import annotations

import copy
import json
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from engine.errors import Busy, EngineError, Unavailable

SCHEMA_VERSION = 1
ETCD_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
# Each commit may carry two operations of the store's own: the commit token that resolves
# unknown outcomes and the leader's fence. The contract leaves room for them on every store,
# so code that passes on SQLite never meets etcd's limit.
RESERVED_OPS = 2
MAX_OPS = ETCD_MAX_TXN_OPS - RESERVED_OPS

Value = dict[str, Any]

# Schema migrations: MIGRATIONS[n] turns a schema-n value into a schema-(n+1) one. A record is
# migrated when read; it is written back in the new schema by its next update.
MIGRATIONS: dict[int, Callable[[Value], Value]] = {}

_KIND = re.compile(r"[a-z][a-z0-9-]*\Z")

__all__ = [
    "MAX_OPS", "SCHEMA_VERSION", "Check", "Compacted", "Conflict", "DELETE", "Delete", "Event",
    "KEEP", "Listing", "Op", "OutcomeUnknown", "Put", "Records", "Store", "Unavailable",
    "UnsupportedSchema", "Value", "Versioned", "Watch", "kind_prefix", "record_key", "split_key",
    "update", "update_many",
]


# -- keys ---------------------------------------------------------------------------------
def record_key(kind: str, name: str) -> str:
    """The key of record `name` of `kind`: record_key("volume", "vol-abc") == "volume/vol-abc"."""
    if not _KIND.match(kind):
        raise ValueError(f"record kind {kind!r}: lower-case letters, digits and '-' only")
    check_key(name)
    return f"{kind}/{name}"


def split_key(key: str) -> tuple[str, str]:
    """(kind, name) of a key made by record_key."""
    kind, sep, name = key.partition("/")
    if not sep or not _KIND.match(kind) or not name:
        raise ValueError(f"{key!r} is not a kind/name key")
    return kind, name


def kind_prefix(kind: str) -> str:
    """The list() prefix of every record of `kind`."""
    if not _KIND.match(kind):
        raise ValueError(f"record kind {kind!r}: lower-case letters, digits and '-' only")
    return f"{kind}/"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"store keys are non-empty strings, not {key!r}")
    if "\x00" in key:
        raise ValueError(f"store key {key!r} contains NUL")
    return key


# -- values ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Versioned:
    """A record and its version. Treat value as read-only: it is the caller's own copy,
    but update() compares against it."""

    value: Value
    version: int


class UnsupportedSchema(RuntimeError):
    """A record written by a newer release (or not by Tandem at all)."""


def encode(value: Value) -> str:
    """The stored form: the value in an envelope that carries its schema version."""
    if not isinstance(value, dict):
        raise ValueError(f"store values are dicts, not {type(value).__name__}")
    try:
        return json.dumps({"schema": SCHEMA_VERSION, "value": value}, sort_keys=True,
                          separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"store value is not JSON-able: {e}") from None


def decode(raw: str | bytes, *, schema: int = SCHEMA_VERSION,
           migrations: Mapping[int, Callable[[Value], Value]] = MIGRATIONS) -> Value:
    """The value of a stored envelope, migrated to `schema`."""
    try:
        envelope = json.loads(raw)
        version, value = envelope["schema"], envelope["value"]
    except (ValueError, TypeError, KeyError) as e:
        raise UnsupportedSchema(f"not a Tandem store record: {e}") from None
    if not isinstance(version, int) or version > schema:
        raise UnsupportedSchema(
            f"record has schema {version}; this release reads up to {schema}: upgrade it")
    while version < schema:
        if version not in migrations:
            raise UnsupportedSchema(f"no migration from record schema {version}")
        value = migrations[version](value)
        version += 1
    return value


# -- operations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Put:
    key: str
    value: Value
    expect: int | None = None  # None: any; 0: absent; N: at version N
    lease: int = 0  # etcd only: the key is deleted when the lease expires

    def __post_init__(self) -> None:
        check_key(self.key)
        _check_expect(self.expect, allow_absent=True)


@dataclass(frozen=True)
class Delete:
    key: str
    expect: int | None = None  # None: any (absent is fine); N: at version N

    def __post_init__(self) -> None:
        check_key(self.key)
        _check_expect(self.expect, allow_absent=False)


@dataclass(frozen=True)
class Check:
    key: str
    expect: int  # 0: absent; N: at version N

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.expect is None:
            raise ValueError("Check needs an expected version (0 for absent)")
        _check_expect(self.expect, allow_absent=True)


Op = Put | Delete | Check


def _check_expect(expect: int | None, *, allow_absent: bool) -> None:
    if expect is None:
        return
    if not isinstance(expect, int) or isinstance(expect, bool) or expect < 0:
        raise ValueError(f"expected version must be an int >= 0, not {expect!r}")
    if expect == 0 and not allow_absent:
        raise ValueError("Delete(expect=0) deletes nothing: use Check(key, 0)")


def validate_ops(ops: Sequence[Op], max_ops: int) -> list[Op]:
    """Check a commit before anything is sent: size, types, one write per key. (Stores
    encode every value before applying anything, which checks the values.)"""
    ops = list(ops)
    if len(ops) > max_ops:
        raise ValueError(f"a commit holds at most {max_ops} operations, not {len(ops)}: "
                         "split it, or keep the records smaller in number")
    written: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete | Check):
            raise ValueError(f"not a store operation: {op!r}")
        if not isinstance(op, Check):
            if op.key in written:
                raise ValueError(f"a commit writes each key once; {op.key!r} is written twice")
            written.add(op.key)
    return ops


def is_write(op: Op) -> bool:
    return not isinstance(op, Check)


# -- errors ----------------------------------------------------------------------------------------
class Conflict(Busy):
    """A guard failed: a key was not at the expected version. Nothing was written."""

    def __init__(self, keys: Sequence[str], message: str = ""):
        self.keys = tuple(keys)
        super().__init__(message or f"conflict on {', '.join(self.keys)}: "
                                    "changed since it was read; read it again and retry")


class OutcomeUnknown(Unavailable):
    """A write was sent, and whether it applied could not be learnt before the timeout."""


class Compacted(EngineError):
    """A watch asked for history the store no longer keeps: list again, then watch from the
    listing's revision + 1."""

    def __init__(self, revision: int, message: str = ""):
        self.revision = revision
        super().__init__(message or f"history before revision {revision} was compacted: "
                                    "list again and watch from the listing's revision + 1")


# -- reads and watches -------------------------------------------------------------------------
Records = list[tuple[str, Versioned]]


@dataclass(frozen=True)
class Listing:
    """One consistent page of records, in key byte order, and the store revision it shows."""

    items: Records
    revision: int


@dataclass(frozen=True)
class Event:
    """A change seen by a watch: value None means the key was deleted."""

    key: str
    value: Versioned | None
    revision: int


_END = object()


def _nothing() -> None:
    pass


class Watch:
    """A stream of Events in revision order. Iterate it, or poll with get(timeout_s).

    Errors end it: Compacted (re-list, then watch from the listing's revision + 1) or
    Unavailable (the store closed). cancel() ends it quietly; iteration then stops.
    """

    def __init__(self, on_cancel: Callable[[], None] = _nothing):
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._finished = threading.Event()  # nothing more will be pushed
        self._ended = False  # the consumer has seen the end

    # producer side
    def push(self, event: Event) -> None:
        if not self._finished.is_set():
            self._queue.put(event)

    def fail(self, error: BaseException) -> None:
        if not self._finished.is_set():
            self._finished.set()
            self._queue.put(error)

    def finish(self) -> None:
        if not self._finished.is_set():
            self._finished.set()
            self._queue.put(_END)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    # consumer side
    def get(self, timeout_s: float | None = None) -> Event | None:
        """The next event; None on timeout or once the watch is cancelled."""
        if self._ended:
            return None
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if item is _END:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def cancel(self) -> None:
        """Stop the watch and release what feeds it (also after it ended on an error)."""
        self.finish()
        on_cancel, self._on_cancel = self._on_cancel, _nothing
        on_cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


# -- the interface -----------------------------------------------------------------------------
class Store(Protocol):
    """What every cluster store offers (SqliteStore, EtcdStore)."""

    max_ops: int

    def get(self, key: str) -> Versioned | None: ...

    def list(self, prefix: str = "", *, after: str = "",
             limit: int = 0) -> Records: ...

    def list_with_revision(self, prefix: str = "", *, after: str = "",
                           limit: int = 0) -> Listing: ...

    def commit(self, ops: Sequence[Op]) -> int: ...

    def watch(self, prefix: str = "", start_revision: int = 0) -> Watch: ...

    def close(self) -> None: ...


# -- read-modify-write -----------------------------------------------------------------------------
class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


KEEP = _Sentinel("KEEP")  # update function's answer: write nothing
DELETE = _Sentinel("DELETE")  # update function's answer: delete the record

UpdateFn = Callable[[Value | None], Value | _Sentinel]
UpdateManyFn = Callable[[dict[str, Versioned | None]], Sequence[Op]]


@dataclass
class Backoff:
    """Bounded retries with full jitter (random sleep in [0, min(cap, base * 2**n)])."""

    attempts: int = 32
    base_s: float = 0.001
    cap_s: float = 0.05
    rng: random.Random = field(default_factory=random.Random)

    def sleep(self, attempt: int) -> None:
        time.sleep(self.rng.uniform(0, min(self.cap_s, self.base_s * (2 ** attempt))))


def update(store: Store, key: str, fn: UpdateFn, *,
           backoff: Backoff | None = None) -> Versioned | None:
    """Read `key`, apply fn, write the result guarded by the version read; retry on Conflict.

    fn gets a copy of the current value (None when absent) and returns the new value, KEEP
    to write nothing (so does returning a value equal to the current one), or DELETE. It may
    run several times, so it must not have side effects; exceptions it raises propagate.
    Returns what is stored afterwards (None when absent). Raises Conflict after
    backoff.attempts lost races.
    """
    backoff = backoff or Backoff()
    for attempt in range(backoff.attempts):
        current = store.get(key)
        new = fn(copy.deepcopy(current.value) if current else None)
        if new is KEEP:
            return current
        if new is DELETE:
            if current is None:
                return None
            op: Op = Delete(key, expect=current.version)
        elif isinstance(new, dict):
            if current is not None and new == current.value:
                return current
            op = Put(key, new, expect=current.version if current else 0)
        else:
            raise TypeError(f"update function returned {new!r}: a dict, KEEP or DELETE")
        try:
            revision = store.commit([op])
        except Conflict:
            backoff.sleep(attempt)
            continue
        return Versioned(op.value, revision) if isinstance(op, Put) else None
    raise Conflict([key], f"update of {key} lost {backoff.attempts} races in a row: retry later")


def update_many(store: Store, keys: Sequence[str], fn: UpdateManyFn, *,
                backoff: Backoff | None = None) -> int:
    """Read several keys, let fn turn them into operations, commit them guarded by every
    version read; retry on Conflict.

    fn gets {key: Versioned | None} (copies) and returns operations. Puts and Deletes of keys
    that were read and carry no expect get the version read as their guard (a Delete of a key
    read as absent becomes Check(key, 0)); every other key read gets a Check, so the commit
    applies only if nothing read has changed. Returns the commit's revision, or 0 when fn
    returned no operations.
    """
    backoff = backoff or Backoff()
    keys = list(dict.fromkeys(keys))
    for attempt in range(backoff.attempts):
        read = {k: store.get(k) for k in keys}
        ops = list(fn(copy.deepcopy(read)))
        if not ops:
            return 0
        guarded = _guard(ops, read)
        try:
            return store.commit(guarded)
        except Conflict:
            backoff.sleep(attempt)
    raise Conflict(keys, f"update of {', '.join(keys)} lost {backoff.attempts} races in a row")


def _guard(ops: list[Op], read: dict[str, Versioned | None]) -> list[Op]:
    out: list[Op] = []
    covered: set[str] = set()
    for op in ops:
        if op.key in read and op.expect is None and not isinstance(op, Check):
            seen = read[op.key]
            version = seen.version if seen else 0
            if isinstance(op, Delete) and version == 0:
                op = Check(op.key, 0)
            else:
                op = replace(op, expect=version)
        if op.expect is not None:
            covered.add(op.key)
        out.append(op)
    for key, seen in read.items():
        if key not in covered:
            out.append(Check(key, seen.version if seen else 0))
    return out
