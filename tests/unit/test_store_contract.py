"""The cluster store contract (control/store.py), run on both stores: SQLite and etcd.

Every test here takes `store` (or `backend`), parametrised over both implementations by the
fixtures below; etcd-only behaviour (failover, TLS, leases, election, unknown
outcomes) is in test_etcd_store.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from control import store as st
from control.store import (
    DELETE,
    KEEP,
    MAX_OPS,
    SCHEMA_VERSION,
    Check,
    Compacted,
    Conflict,
    Delete,
    Put,
    UnsupportedSchema,
    Versioned,
    record_key,
    update,
    update_many,
)
from engine.errors import Busy
from tests.store_backends import EtcdBackend, SqliteBackend


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    """Each cluster store in turn; stores opened through it are closed after the test."""
    if request.param == "sqlite":
        b = SqliteBackend(str(tmp_path))
    else:
        cluster = request.getfixturevalue("etcd1")
        if not all(m.running() for m in cluster.members):  # a test killed it: bring it back
            for m in cluster.members:
                if not m.running():
                    m.start()
            cluster.wait_healthy()
        b = EtcdBackend(cluster)
    try:
        yield b
    finally:
        b.close()
    if request.param == "etcd":
        b.cluster.check_running()


@pytest.fixture
def store(backend):
    return backend.open()


# -- versions and guards ----------------------------------------------------------------------
def test_versions_grow_and_never_repeat_even_after_delete_and_recreate(store):
    r1 = store.commit([Put("volume/a", {"n": 1})])
    assert r1 > 0 and store.get("volume/a") == Versioned({"n": 1}, r1)
    r2 = store.commit([Put("volume/a", {"n": 2})])
    assert r2 > r1 and store.get("volume/a").version == r2
    r3 = store.commit([Delete("volume/a")])
    assert r3 > r2 and store.get("volume/a") is None
    r4 = store.commit([Put("volume/a", {"n": 1})])
    assert r4 > r3 and store.get("volume/a") == Versioned({"n": 1}, r4)
    # the old version can never match the new record
    with pytest.raises(Conflict):
        store.commit([Put("volume/a", {"n": 9}, expect=r1)])


def test_one_commit_gives_every_key_it_writes_the_same_new_version(store):
    rev = store.commit([Put("volume/a", {}), Put("volume/b", {})])
    assert store.get("volume/a").version == store.get("volume/b").version == rev


def test_create_if_absent_creates_once(store):
    rev = store.commit([Put("volume/a", {"owner": "first"}, expect=0)])
    with pytest.raises(Conflict) as e:
        store.commit([Put("volume/a", {"owner": "second"}, expect=0)])
    assert e.value.keys == ("volume/a",) and "volume/a" in str(e.value)
    assert store.get("volume/a") == Versioned({"owner": "first"}, rev)


def test_compare_and_swap_on_versions(store):
    v1 = store.commit([Put("volume/a", {"n": 1})])
    v2 = store.commit([Put("volume/a", {"n": 2}, expect=v1)])
    with pytest.raises(Conflict):
        store.commit([Put("volume/a", {"n": 3}, expect=v1)])  # stale
    with pytest.raises(Conflict):
        store.commit([Delete("volume/a", expect=v1)])
    with pytest.raises(Conflict):
        store.commit([Check("volume/a", expect=0)])
    with pytest.raises(Conflict):
        store.commit([Delete("volume/absent", expect=v2)])
    assert store.get("volume/a") == Versioned({"n": 2}, v2)
    store.commit([Check("volume/a", v2), Check("volume/absent", 0)])
    store.commit([Delete("volume/a", expect=v2)])
    assert store.get("volume/a") is None
    store.commit([Delete("volume/a")])  # unconditional delete of an absent key: fine


def test_conflict_is_a_busy_error_and_names_every_failed_key(store):
    store.commit([Put("volume/a", {}), Put("volume/b", {})])
    with pytest.raises(Conflict) as e:
        store.commit([Check("volume/a", 0), Put("volume/c", {}, expect=0),
                      Put("volume/b", {}, expect=0)])
    assert isinstance(e.value, Busy)  # the CSI translator answers ABORTED
    assert set(e.value.keys) == {"volume/a", "volume/b"}


def test_a_commit_applies_all_or_nothing(store):
    v = store.commit([Put("volume/a", {"n": 1}), Put("placement/a", {"node": "x"})])
    with pytest.raises(Conflict) as e:
        store.commit([Put("volume/a", {"n": 2}, expect=v), Put("volume/b", {"n": 1}, expect=0),
                      Delete("placement/a"), Check("node/x", expect=v)])
    assert e.value.keys == ("node/x",)
    assert store.get("volume/a") == Versioned({"n": 1}, v)
    assert store.get("volume/b") is None
    assert store.get("placement/a") == Versioned({"node": "x"}, v)
    v2 = store.commit([Put("volume/a", {"n": 2}, expect=v), Put("volume/b", {"n": 1}, expect=0),
                       Delete("placement/a", expect=v)])
    assert [store.get(k) for k in ("volume/a", "volume/b", "placement/a")] == [
        Versioned({"n": 2}, v2), Versioned({"n": 1}, v2), None]


def test_commit_limit_is_checked_before_anything_is_sent(store):
    assert store.max_ops == MAX_OPS == 126  # etcd's 128, less the token and the leader fence
    ops = [Put(f"volume/{i:03d}", {"i": i}, expect=0) for i in range(store.max_ops)]
    store.commit(ops)
    assert len(store.list("volume/")) == store.max_ops
    too_many = [Put(f"node/{i:03d}", {}, expect=0) for i in range(store.max_ops + 1)]
    with pytest.raises(ValueError, match=f"at most {store.max_ops} operations"):
        store.commit(too_many)
    assert store.list("node/") == []


@pytest.mark.parametrize("ops, message", [
    ([Put("volume/a", {}), Delete("volume/a")], "written twice"),
    ([Put("volume/a", {"x": {1, 2}})], "not JSON-able"),
    ([Put("volume/a", {"x": float("nan")})], "not JSON-able"),
    ([Put("volume/a", ["not", "a", "dict"])], "dicts"),
    (["volume/a"], "not a store operation"),
])
def test_bad_commits_are_refused_whole(store, ops, message):
    with pytest.raises(ValueError, match=message):
        store.commit([Put("volume/ok", {}), *ops])
    assert store.get("volume/ok") is None


def test_bad_operations_are_refused_when_made():
    with pytest.raises(ValueError, match="Check"):
        Delete("volume/a", expect=0)
    with pytest.raises(ValueError):
        Put("", {})
    with pytest.raises(ValueError):
        Put("volume/a", {}, expect=-1)
    with pytest.raises(ValueError):
        Check("volume/a", expect=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Put("volume/\x00", {})


def test_record_keys():
    assert record_key("volume", "vol-abc") == "volume/vol-abc"
    assert st.split_key("volume/vol-abc/x") == ("volume", "vol-abc/x")
    assert st.kind_prefix("node") == "node/"
    for kind in ("", "Volume", "vol/ume", "1vol"):
        with pytest.raises(ValueError):
            record_key(kind, "a")
    with pytest.raises(ValueError):
        record_key("volume", "")
    with pytest.raises(ValueError):
        st.split_key("novolume")


# -- reads ----------------------------------------------------------------------------------------
KEYS = ["volume/a", "volume/B", "volume/a0", "volume/a/b", "volume/\u00e9", "volume/\u4e2d",
        "volume/z", "volume/~", "volumes/x", "volume", "placement/a"]


def test_list_is_in_key_byte_order_and_pages_by_key(store):
    store.commit([Put(k, {"k": k}) for k in KEYS])
    expected = sorted((k for k in KEYS if k.startswith("volume/")), key=lambda k: k.encode())
    assert [k for k, _ in store.list("volume/")] == expected
    assert [k for k, _ in store.list("")] == sorted(KEYS, key=lambda k: k.encode())
    pages, after = [], ""
    while page := store.list("volume/", after=after, limit=3):
        assert len(page) <= 3
        pages.append([k for k, _ in page])
        after = page[-1][0]
    assert sum(pages, []) == expected and len(pages) == 3
    assert store.list("volume/\u00e9") == [("volume/\u00e9", store.get("volume/\u00e9"))]
    assert store.list("nothing/") == []


def test_list_with_revision_matches_the_store(store):
    rev = store.commit([Put("volume/a", {}), Put("volume/b", {})])
    listing = store.list_with_revision("volume/")
    assert listing.revision >= rev
    assert [k for k, _ in listing.items] == ["volume/a", "volume/b"]
    assert all(v.version <= listing.revision for _, v in listing.items)


def test_each_list_is_a_consistent_snapshot(store):
    """A writer keeps two records equal with multi-key commits: no list sees them differ."""
    store.commit([Put("pair/a", {"n": 0}), Put("pair/b", {"n": 0})])
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.commit([Put("pair/a", {"n": n}), Put("pair/b", {"n": n})])

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 10
        while len(seen) < 20 and time.monotonic() < deadline:
            items = dict(store.list("pair/"))
            assert items["pair/a"] == items["pair/b"]
            seen.add(items["pair/a"].value["n"])
    finally:
        stop.set()
        t.join()
    assert len(seen) == 20  # lists ran while the writer made progress


# -- read-modify-write -------------------------------------------------------------------------
def _increment(value):
    value = value or {"n": 0}
    value["n"] += 1
    return value


def test_concurrent_updates_lose_nothing(backend):
    stores = [backend.open(), backend.open()]  # two clients, as two controllers would be
    threads, per_thread = 8, 15
    errors = []

    def work(i: int) -> None:
        try:
            for _ in range(per_thread):
                update(stores[i % 2], "counter/x", _increment)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert stores[0].get("counter/x").value == {"n": threads * per_thread}


def test_update_many_keeps_an_invariant_across_keys(store):
    store.commit([Put("account/a", {"n": 100}), Put("account/b", {"n": 0})])

    def move(read):
        a, b = read["account/a"].value, read["account/b"].value
        return [Put("account/a", {"n": a["n"] - 1}), Put("account/b", {"n": b["n"] + 1})]

    def audit(read):  # reads both, writes a third record: guarded by both versions
        total = read["account/a"].value["n"] + read["account/b"].value["n"]
        return [Put("audit/total", {"n": total})]

    def mover() -> None:
        for _ in range(20):
            update_many(store, ["account/a", "account/b"], move)

    ts = [threading.Thread(target=mover) for _ in range(4)]
    for t in ts:
        t.start()
    for _ in range(10):
        update_many(store, ["account/a", "account/b"], audit)
        assert store.get("audit/total").value == {"n": 100}
    for t in ts:
        t.join()
    assert store.get("account/a").value == {"n": 20}
    assert store.get("account/b").value == {"n": 80}
    assert update_many(store, ["account/a"], lambda read: []) == 0


def test_update_can_create_keep_and_delete(store):
    created = update(store, "volume/a", lambda v: {"size": 1} if v is None else KEEP)
    assert created == store.get("volume/a") and created.value == {"size": 1}
    assert update(store, "volume/a", lambda v: KEEP) == created
    assert update(store, "volume/a", lambda v: v) == created  # unchanged: nothing written
    changed = update(store, "volume/a", lambda v: {**v, "size": 2})
    assert changed.version > created.version
    assert update(store, "volume/a", lambda v: DELETE) is None
    assert store.get("volume/a") is None
    assert update(store, "volume/a", lambda v: DELETE) is None  # absent: nothing to do

    def refuse(v):
        raise LookupError("no such volume")

    with pytest.raises(LookupError):
        update(store, "volume/a", refuse)
    with pytest.raises(TypeError):
        update(store, "volume/a", lambda v: "neither")


def test_update_gives_up_after_its_attempts_with_a_conflict(store):
    """A function that always loses its race ends in Conflict, not a loop."""
    calls = []

    def racing(v):
        calls.append(1)
        store.commit([Put("volume/hot", {"n": len(calls)})])  # someone else wins each time
        return {"mine": True}

    store.commit([Put("volume/hot", {"n": 0})])
    with pytest.raises(Conflict, match="lost 3 races"):
        update(store, "volume/hot", racing, backoff=st.Backoff(attempts=3))
    assert len(calls) == 3


# -- watches ---------------------------------------------------------------------------------
def _events(watch, n, timeout_s=5.0):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        ev = watch.get(0.1)
        if ev is not None:
            out.append(ev)
    return out


def test_watch_sees_puts_and_deletes_in_order(store):
    with store.watch("volume/") as w:
        r1 = store.commit([Put("volume/a", {"n": 1}), Put("node/x", {})])
        r2 = store.commit([Put("volume/b", {"n": 2}), Delete("volume/a")])
        store.commit([Delete("volume/absent")])  # no change, no event
        r3 = store.commit([Put("volume/b", {"n": 3})])
        events = _events(w, 4)
    assert [(e.key, e.value, e.revision) for e in events] == [
        ("volume/a", Versioned({"n": 1}, r1), r1),
        ("volume/b", Versioned({"n": 2}, r2), r2),
        ("volume/a", None, r2),
        ("volume/b", Versioned({"n": 3}, r3), r3),
    ]
    assert w.get(0.2) is None


def test_list_then_watch_from_the_listing_misses_nothing(store):
    store.commit([Put("volume/a", {"n": 1})])
    listing = store.list_with_revision("volume/")
    r2 = store.commit([Put("volume/b", {"n": 2})])  # between the list and the watch
    with store.watch("volume/", listing.revision + 1) as w:
        r3 = store.commit([Put("volume/c", {"n": 3})])
        events = _events(w, 2)
    assert [(e.key, e.revision) for e in events] == [("volume/b", r2), ("volume/c", r3)]


def test_a_cancelled_watch_ends(store):
    w = store.watch("volume/")
    received = []
    t = threading.Thread(target=lambda: received.extend(iter(w)))
    t.start()
    store.commit([Put("volume/a", {})])
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    w.cancel()
    t.join(5)
    assert not t.is_alive() and [e.key for e in received] == ["volume/a"]
    store.commit([Put("volume/b", {})])
    assert w.get(0.1) is None


def test_a_watch_on_lost_history_ends_with_compacted(backend, store):
    r1 = store.commit([Put("volume/a", {"n": 1})])
    store.commit([Put("volume/a", {"n": 2})])
    if backend.name == "etcd":
        store.compact(store.revision())
    else:  # SQLite keeps history since it was opened: reopen
        store.close()
        store = backend.open()
    w = store.watch("volume/", r1)
    with pytest.raises(Compacted):
        w.get(5)
    assert w.get(0.1) is None  # ended


# -- schema and durability -----------------------------------------------------------------------
def test_every_record_carries_the_schema_version(backend, store):
    store.commit([Put("volume/a", {"size": 1})])
    assert json.loads(backend.raw_get("volume/a")) == {"schema": SCHEMA_VERSION,
                                                       "value": {"size": 1}}
    backend.raw_set("volume/a", json.dumps({"schema": SCHEMA_VERSION + 1, "value": {}}))
    with pytest.raises(UnsupportedSchema, match="upgrade"):
        store.get("volume/a")
    backend.raw_set("volume/a", "not json")
    with pytest.raises(UnsupportedSchema):
        store.get("volume/a")


def test_old_schemas_are_migrated_when_read():
    migrations = {1: lambda v: {**v, "tier": "standard"}, 2: lambda v: {**v, "v3": True}}
    old = json.dumps({"schema": 1, "value": {"size": 1}})
    assert st.decode(old, schema=3, migrations=migrations) == {
        "size": 1, "tier": "standard", "v3": True}
    with pytest.raises(UnsupportedSchema, match="no migration"):
        st.decode(old, schema=3, migrations={1: migrations[1]})


def test_committed_records_survive_a_crash(backend):
    """SQLite: the writing process is SIGKILLed; etcd: every member is SIGKILLed."""
    acknowledged = backend.write_then_crash(40)
    store = backend.open()
    for key in acknowledged:
        assert store.get(key) is not None, key
    # and the revision counter went on from where it was: no version is reused
    top = max(store.get(k).version for k in acknowledged)
    assert store.commit([Put("volume/after", {})]) > top
