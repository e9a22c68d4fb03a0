import multiprocessing
import os
import signal

import pytest

from engine.state import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "state.sqlite"))
    yield s
    s.close()


def test_put_get_delete(store):
    assert store.get("volume", "a") is None
    store.put("volume", "a", {"x": 1})
    assert store.get("volume", "a") == {"x": 1}
    store.put("volume", "a", {"x": 2})
    assert store.get("volume", "a") == {"x": 2}
    store.delete("volume", "a")
    store.delete("volume", "a")  # idempotent
    assert store.get("volume", "a") is None


def test_list_is_ordered_paged_and_prefixed(store):
    for key in ["b", "a", "c", "ab"]:
        store.put("k", key, {"key": key})
    store.put("other", "a", {})
    assert [k for k, _ in store.list("k")] == ["a", "ab", "b", "c"]
    assert [k for k, _ in store.list("k", after="ab", limit=1)] == ["b"]
    assert [k for k, _ in store.list("k", prefix="a")] == ["a", "ab"]


def test_txn_is_all_or_nothing(store):
    with pytest.raises(RuntimeError):
        with store.txn() as t:
            t.put("k", "1", {})
            t.put("k", "2", {})
            raise RuntimeError("boom")
    assert store.list("k") == []


def test_newer_schema_is_refused(store):
    store.put("k", "1", {})
    store._conn.execute("UPDATE records SET schema=99")
    with pytest.raises(RuntimeError, match="newer"):
        store.get("k", "1")


def _write_forever(path):
    s = SqliteStore(path)
    i = 0
    while True:
        with s.txn() as t:
            t.put("k", "a", {"i": i})
            t.put("k", "b", {"i": i})
        i += 1


def test_kill_9_mid_writes_leaves_a_consistent_store(tmp_path):
    path = str(tmp_path / "state.sqlite")
    SqliteStore(path).close()
    proc = multiprocessing.get_context("spawn").Process(target=_write_forever, args=(path,))
    proc.start()
    try:
        for _ in range(200):  # wait until it has written a little
            s = SqliteStore(path)
            got = s.get("k", "a")
            s.close()
            if got and got["i"] > 50:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    s = SqliteStore(path)
    a, b = s.get("k", "a"), s.get("k", "b")
    s.close()
    assert a == b  # both keys of every transaction, never one


def test_concurrent_transactions_are_group_committed(tmp_path):
    import threading

    s = SqliteStore(str(tmp_path / "state.sqlite"))
    errors = []

    def worker(i):
        try:
            for j in range(50):
                with s.txn() as t:
                    t.put("k", f"{i}-{j}", {"i": i, "j": j})
                # durable (committed) when txn() returns: another connection sees it
                assert s.get("k", f"{i}-{j}") == {"i": i, "j": j}
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(s.list("k")) == 400
    assert 0 < s.groups < 400  # some commits carried several transactions
    s.close()


def test_a_failing_transaction_leaves_its_group_intact(store):
    import threading

    barrier = threading.Barrier(2)
    outcome = {}

    def good():
        barrier.wait()
        with store.txn() as t:
            t.put("k", "good", {})
        outcome["good"] = True

    t = threading.Thread(target=good)
    t.start()
    barrier.wait()
    with pytest.raises(ValueError):
        with store.txn() as txn:
            txn.put("k", "bad", {})
            raise ValueError("no")
    t.join()
    assert outcome == {"good": True}
    assert [k for k, _ in store.list("k")] == ["good"]


def test_transactions_do_not_nest(store):
    with store.txn():
        with pytest.raises(RuntimeError, match="nest"):
            with store.txn():
                pass
