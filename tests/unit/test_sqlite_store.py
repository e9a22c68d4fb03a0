"""What the SQLite cluster store does beyond the contract (test_store_contract.py)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from control import sqlite_store
from control.sqlite_store import SqliteStore, prefix_end
from control.store import Compacted, Conflict, Put, Unavailable


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "cluster.sqlite")


def test_the_file_and_its_journal_are_private(path):
    old = os.umask(0)
    try:
        store = SqliteStore(path)
        store.commit([Put("volume/a", {})])
        for name in (path, path + "-wal", path + "-shm"):
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
        store.close()
    finally:
        os.umask(old)


def test_two_store_objects_on_one_file_share_one_revision_counter(path):
    a, b = SqliteStore(path), SqliteStore(path)
    try:
        ra = a.commit([Put("volume/a", {})])
        rb = b.commit([Put("volume/b", {})])
        assert rb > ra
        with pytest.raises(Conflict):  # b's version cannot be mistaken for a's
            b.commit([Put("volume/b", {"x": 1}, expect=ra)])
    finally:
        a.close()
        b.close()


def test_a_failed_guard_rolls_back_only_its_own_commit_in_a_group(path):
    store = SqliteStore(path)
    rounds, threads = 4, 24
    errors = []
    try:
        for r in range(rounds):
            barrier = threading.Barrier(threads)

            def work(i: int, r: int = r, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    if i % 2:  # all race for one key: one wins, the rest conflict
                        store.commit([Put(f"odd/{r}-{i}", {}), Put(f"shared/{r}", {"i": i},
                                                                    expect=0)])
                    else:
                        store.commit([Put(f"even/{r}-{i}", {}, expect=0)])
                except Conflict:
                    pass
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            winner = store.get(f"shared/{r}").value["i"]
            assert [k for k, _ in store.list(f"odd/{r}-")] == [f"odd/{r}-{winner}"]
        assert errors == []
        assert len(store.list("even/")) == rounds * threads // 2
        assert store.groups < store.commits  # commits were grouped: fewer fsyncs than commits
    finally:
        store.close()


def test_leases_need_etcd(path):
    with SqliteStore(path) as store:
        with pytest.raises(ValueError, match="leases"):
            store.commit([Put("volume/a", {}, lease=7)])


def test_a_closed_store_refuses_and_ends_its_watches(path):
    store = SqliteStore(path)
    w = store.watch("volume/")
    store.close()
    with pytest.raises(Unavailable):
        store.commit([Put("volume/a", {})])
    with pytest.raises(Unavailable):
        w.get(1)
    store.close()  # twice is fine


def test_watches_replay_recent_history_only(path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "HISTORY_EVENTS", 10)
    with SqliteStore(path) as store:
        revisions = [store.commit([Put("volume/a", {"n": n})]) for n in range(15)]
        with store.watch("volume/", revisions[-10]) as w:  # still kept
            assert [w.get(1).revision for _ in range(10)] == revisions[-10:]
        w = store.watch("volume/", revisions[-11])  # dropped
        with pytest.raises(Compacted):
            w.get(1)


@pytest.mark.parametrize("prefix, end", [
    ("", None), ("a", "b"), ("volume/", "volume0"), ("a\U0010ffff", "b"),
    ("\U0010ffff", None), ("a\ud7ff", "a\ue000"),
])
def test_prefix_end(prefix, end):
    assert prefix_end(prefix) == end
