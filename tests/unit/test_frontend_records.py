"""A node's records of the mirrored volumes attached to it (control/frontend_backend.py):
the tier kept apart from the stage (a ModifyVolume between attach and stage wins over the
attach's), and a snapshot's stage hold while no frontend serves the volume there."""

from __future__ import annotations

import pytest

from control.frontend_backend import FrontendBackend, FrontendVolume
from engine.errors import Busy
from engine.qos.tiers import DEFAULT_TIERS, QosSpec
from engine.state import SqliteStore

GOLD, SILVER = DEFAULT_TIERS["gold"].to_json(), DEFAULT_TIERS["silver"].to_json()


@pytest.fixture
def backend(tmp_path):
    store = SqliteStore(str(tmp_path / "state.sqlite"))
    yield FrontendBackend(store, None, "n1")  # type: ignore[arg-type]  # records only
    store.close()


def volume() -> FrontendVolume:
    return FrontendVolume("vol-1", 1 << 30, ("n1@198.18.0.11:7400",), 3, 1, ("mount",))


def tier(backend: FrontendBackend) -> QosSpec:
    backing = backend.get("vol-1")
    assert backing is not None
    return QosSpec.from_json(backing.qos_json)


def test_the_tier_from_the_attach_is_kept_at_the_stage(backend):
    backend.prepare(volume(), GOLD, 5)
    assert tier(backend) == DEFAULT_TIERS["gold"]
    backend.set_made_fs("vol-1", "xfs", True)  # the stage's own updates keep it
    assert tier(backend) == DEFAULT_TIERS["gold"]


def test_a_modify_between_attach_and_stage_outlives_the_attachs_tier(backend):
    backend.set_qos("vol-1", SILVER, 7)  # ModifyVolume reached the node before the stage
    backend.prepare(volume(), GOLD, 5)  # the stage brings the attach's (older) tier
    assert tier(backend) == DEFAULT_TIERS["silver"]
    backend.set_qos("vol-1", GOLD, 9)
    assert tier(backend) == DEFAULT_TIERS["gold"]
    backend.forget("vol-1")  # unstaged: nothing is left of it
    assert backend.get("vol-1") is None
    assert backend.store.get("frontend-qos", "vol-1") is None


def test_a_stage_hold_makes_staging_wait_until_released_or_over(backend, monkeypatch):
    backend.prepare(volume())
    backend.hold_stage("vol-1", "snap-1", 30.0)
    with pytest.raises(Busy, match="snapshot"):
        backend._check_stage_hold("vol-1")
    assert backend.release_stage("vol-1", "snap-2") is False  # another barrier's token
    assert backend.release_stage("vol-1", "snap-1") is True
    backend._check_stage_hold("vol-1")  # released: staging goes on
    backend.hold_stage("vol-1", "snap-3", 30.0)
    import control.frontend_backend as fb
    now = fb.time.time()
    monkeypatch.setattr(fb.time, "time", lambda: now + 31)  # nobody released it in time
    backend._check_stage_hold("vol-1")
    assert backend.release_stage("vol-1", "snap-3") is False  # it did not hold throughout
