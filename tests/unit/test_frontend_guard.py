"""LeaseGuard's decision table: may a cluster frontend serve now?

The lease is a real control.etcd_lease.Lease whose state is set as its renewals would set
it (no etcd needed for that); the core is a stand-in that reports what
MirrorCore.proof_of_ownership would (the real method is tested in test_mirror_core.py,
the whole with real processes in tests/integration/test_node_mirror.py and
test_cluster_mirror.py).
"""

from __future__ import annotations

import logging
import time

import pytest

from control.etcd_lease import Lease
from control.frontend_main import LeaseGuard, proof_window

TTL, MARGIN, WINDOW = 6, 2.0, 2.0


class Replicas:
    """What the core would say: (in-sync replicas that answered since `since`, needed)."""

    def __init__(self, proven: int, needed: int = 2):
        self.proven, self.needed = proven, needed
        self.asked: list[float] = []

    def proof_of_ownership(self, since: float) -> tuple[int, int]:
        self.asked.append(since)
        return self.proven, self.needed


def lease(remaining_s: float, gone: bool = False) -> Lease:
    """A persistent lease certainly valid for remaining_s more (0: no renewal got through
    for longer than the TTL)."""
    got = Lease(None, 0x1, TTL, time.monotonic() - TTL + remaining_s,  # type: ignore[arg-type]
                persistent=True)
    if gone:
        got.gone.set()
        got.lost.set()
    return got


def test_a_certainly_valid_lease_is_enough_whatever_the_replicas_say():
    core = Replicas(proven=0)
    assert LeaseGuard(lease(5.0), MARGIN, WINDOW).check(core) == ""  # type: ignore[arg-type]
    assert core.asked == []  # not even asked


@pytest.mark.parametrize("remaining", [0.0, 1.5])
def test_an_unknown_lease_with_enough_replicas_keeps_serving(remaining, caplog):
    core = Replicas(proven=2, needed=2)
    guard = LeaseGuard(lease(remaining), MARGIN, WINDOW)
    with caplog.at_level(logging.WARNING, "tandem.frontend"):
        for _ in range(3):
            assert guard.check(core) == ""  # type: ignore[arg-type]
    assert guard.on_replicas_word
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "on the word of 2 in-sync replicas" in said[0]  # once
    # the answers counted are those to probes sent within the window
    assert all(abs(time.monotonic() - WINDOW - since) < 1.0 for since in core.asked)


def test_an_unknown_lease_with_too_few_replicas_fences():
    why = LeaseGuard(lease(1.9), MARGIN, WINDOW).check(Replicas(proven=1))  # type: ignore[arg-type]
    assert "only 1 in-sync replicas answered" in why and "2 rule out a takeover" in why


def test_a_lease_etcd_says_is_gone_fences_whatever_the_replicas_say():
    core = Replicas(proven=3)
    why = LeaseGuard(lease(5.0, gone=True), MARGIN, WINDOW).check(core)  # type: ignore[arg-type]
    assert "lease is gone" in why
    why = LeaseGuard(lease(0.0, gone=True), MARGIN, WINDOW).check(core)  # type: ignore[arg-type]
    assert "lease is gone" in why


def test_the_lease_back_is_said_once(caplog):
    core = Replicas(proven=2)
    held = lease(0.0)
    guard = LeaseGuard(held, MARGIN, WINDOW)
    assert guard.check(core) == ""  # type: ignore[arg-type]
    held._valid_until = time.monotonic() + TTL  # a renewal got through  # noqa: SLF001
    caplog.clear()
    with caplog.at_level(logging.WARNING, "tandem.frontend"):
        assert guard.check(core) == "" and guard.check(core) == ""  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "etcd renewed the lease again: serving under it"]
    assert not guard.on_replicas_word


def test_without_a_proof_window_the_lease_alone_decides():
    core = Replicas(proven=3)
    why = LeaseGuard(lease(1.0), MARGIN, 0.0).check(core)  # type: ignore[arg-type]
    assert "self-fenced before etcd can expire it" in why and core.asked == []


def test_the_proof_window_ends_no_later_than_the_lease_alone_would_have():
    # cut off at p, last renewal that got through sent at s >= p - 2 * period: answers from
    # p on stop counting at p + window <= s + TTL - margin
    assert proof_window(10, 3.0, 1.0) == 5.0
    assert proof_window(6, 2.0, 1.0) == 2.0
    assert proof_window(4, 2.0, 1.0) <= 0  # too short: the lease alone decides
