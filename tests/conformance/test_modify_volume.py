"""ControllerModifyVolume: `tier: gold` works on volumes made with or without mutable
parameters; an unknown key (or tier) is INVALID_ARGUMENT and changes nothing.

The error table for empty and unknown IDs is in test_controller_errors.py.
"""

from __future__ import annotations

import pytest

from proto import csi_pb2
from tests.conformance.helpers import INVALID, expect_code, ok


def stored_mutable(driver, volume_id: str) -> dict:
    """The controller's record of the volume (the API has no read-back of these)."""
    return driver.driver.cluster_store.get(f"volume/{volume_id}").value["mutable_parameters"]


def modify(co, volume_id: str, params: dict[str, str]):
    return csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)


@pytest.mark.parametrize("made_with", [{}, {"tier": "gold"}, {"tier": "bronze"}],
                         ids=["without", "with-gold", "with-bronze"])
def test_tier_gold_works(co, driver, made_with):
    vol = co.create(mutable_parameters=made_with)
    ok(co.stubs.controller.ControllerModifyVolume, modify(co, vol.volume_id, {"tier": "gold"}),
       repeat=3)
    assert stored_mutable(driver, vol.volume_id)["tier"] == "gold"


@pytest.mark.parametrize("bad", [
    {"XXX_FakeKey": "XXX_FakeValue"},
    {"tier": "silver", "XXX_FakeKey": "XXX_FakeValue"},  # a valid key beside it changes nothing
    {"tier": "no-such-tier"},
], ids=["unknown-key", "valid-and-unknown-key", "unknown-tier"])
def test_invalid_modification_changes_nothing(co, driver, bad):
    vol = co.create(mutable_parameters={"tier": "gold"})
    before = stored_mutable(driver, vol.volume_id)
    expect_code(co.stubs.controller.ControllerModifyVolume, modify(co, vol.volume_id, bad),
                INVALID)
    assert stored_mutable(driver, vol.volume_id) == before
    # and the volume is still fine to modify
    ok(co.stubs.controller.ControllerModifyVolume, modify(co, vol.volume_id, {"tier": "gold"}))
