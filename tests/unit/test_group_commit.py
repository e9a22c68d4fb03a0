"""engine/group_commit.py on a real SQLite file: bodies grouped, failures kept apart."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.group_commit import GroupCommit


class Closed(Exception):
    pass


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "g.sqlite")
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    yield path, conn
    conn.close()


def keys(path):
    with sqlite3.connect(path) as c:  # another connection: what is committed
        return sorted(k for (k,) in c.execute("SELECT k FROM t"))


def run_together(gc, conn, bodies):
    """Run each body(conn) as a GroupCommit body, all queued at once, so they share groups;
    returns each one's outcome (None or the exception)."""
    outcomes: dict[int, BaseException | None] = {}
    start = threading.Barrier(len(bodies))

    def run(i, body):
        start.wait()
        try:
            with gc.body():
                body(conn)
            outcomes[i] = None
        except BaseException as e:  # noqa: BLE001
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [outcomes[i] for i in range(len(bodies))]


def insert(k):
    return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (k,))


def test_a_lone_body_is_committed_when_it_returns(db):
    path, conn = db
    gc = GroupCommit(conn, Closed)
    with gc.body():
        insert("a")(conn)
    assert keys(path) == ["a"]
    assert (gc.bodies, gc.groups) == (1, 1)


def test_concurrent_bodies_share_commits(db):
    path, conn = db
    gc = GroupCommit(conn, Closed)
    outcomes = run_together(gc, conn, [insert(f"k{i:02}") for i in range(16)])
    assert outcomes == [None] * 16
    assert keys(path) == [f"k{i:02}" for i in range(16)]
    assert gc.bodies == 16 and gc.groups <= 16


def test_a_failing_body_loses_only_its_own_writes(db):
    """First in its group (no savepoint) or later (a savepoint): the others' writes stay."""
    path, conn = db
    gc = GroupCommit(conn, Closed)

    def failing(conn):
        conn.execute("INSERT INTO t VALUES ('bad')")
        raise ValueError("no")

    with pytest.raises(ValueError):  # alone: its group's first body, without a savepoint
        with gc.body():
            failing(conn)
    assert keys(path) == []
    for position in range(3):  # the failing body first, in the middle, last
        conn.execute("DELETE FROM t")
        bodies = [insert("x"), insert("y")]
        bodies.insert(position, failing)
        outcomes = run_together(gc, conn, bodies)
        assert isinstance(outcomes[position], ValueError)
        assert [o for i, o in enumerate(outcomes) if i != position] == [None, None]
        assert keys(path) == ["x", "y"]


def test_a_body_undone_from_inside_ends_normally_and_keeps_the_others(db):
    path, conn = db
    gc = GroupCommit(conn, Closed)

    def undone(conn):
        conn.execute("INSERT INTO t VALUES ('undone')")
        gc.undo_body()
        conn.execute("INSERT INTO t VALUES ('after-undo')")  # the body goes on, in a group

    with gc.body():  # alone: the group's first body, no savepoint
        undone(conn)
    assert keys(path) == ["after-undo"]
    conn.execute("DELETE FROM t")
    outcomes = run_together(gc, conn, [insert("x"), undone, insert("y")])
    assert outcomes == [None, None, None]
    assert keys(path) == ["after-undo", "x", "y"]


def test_a_failed_commit_reaches_every_member_and_writes_nothing(db):
    path, conn = db
    fail = threading.Event()
    finished: list[bool] = []

    def before_commit():
        if fail.is_set():
            raise sqlite3.OperationalError("disk I/O error")

    gc = GroupCommit(conn, Closed, before_commit=before_commit,
                     after_commit=finished.append)
    fail.set()
    outcomes = run_together(gc, conn, [insert("a"), insert("b"), insert("c")])
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes)
    assert keys(path) == []
    assert finished and not any(finished)
    fail.clear()
    with gc.body():  # the writer is usable again
        insert("d")(conn)
    assert keys(path) == ["d"]


def test_close_commits_the_open_group_and_refuses_later_bodies(db):
    path, conn = db
    gc = GroupCommit(conn, Closed)
    with gc.body():
        insert("a")(conn)
    gc.close()
    with pytest.raises(Closed):
        with gc.body():
            insert("b")(conn)
    assert keys(path) == ["a"]
