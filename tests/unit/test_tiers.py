import json

import pytest

from engine.errors import InvalidSpec
from engine.qos.tiers import DEFAULT_TIERS, QosSpec, load_tiers, resolve_qos


def test_no_parameters_means_no_qos():
    spec = resolve_qos({}, {})
    assert spec == QosSpec()
    assert not spec.limited and spec.min_iops == 0


def test_named_tier():
    assert resolve_qos({"tier": "gold"}) == DEFAULT_TIERS["gold"]


def test_mutable_parameters_override_parameters():
    assert resolve_qos({"tier": "bronze"}, {"tier": "gold"}).name == "gold"


def test_explicit_numbers_override_the_tier():
    spec = resolve_qos({"tier": "silver", "maxReadIops": "1234"})
    assert spec.max_read_iops == 1234
    assert spec.max_write_iops == DEFAULT_TIERS["silver"].max_write_iops


@pytest.mark.parametrize(
    "params",
    [
        {"tier": "platinum"},
        {"maxReadIops": "lots"},
        {"maxReadIops": "-1"},
        {"maxReadIops": "1e9"},
        {"maxReadIops": "1000000000"},
        {"minReadIops": "500", "maxReadIops": "100"},
    ],
)
def test_invalid(params):
    with pytest.raises(InvalidSpec):
        resolve_qos(params)


def test_sidecar_and_other_keys_are_not_qos():
    # key checking is the CSI layer's job; resolve_qos only looks at its own keys
    assert resolve_qos({"csi.storage.k8s.io/pvc/name": "x"}) == QosSpec()


def test_json_round_trip():
    spec = DEFAULT_TIERS["gold"]
    assert QosSpec.from_json(spec.to_json()) == spec


def test_load_tiers(tmp_path):
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"fast": {"max_read_iops": 100, "min_read_iops": 10}}))
    tiers = load_tiers(str(path))
    assert tiers["fast"].max_read_iops == 100 and tiers["fast"].name == "fast"
    path.write_text(json.dumps({"bad": {"max_read_iops": 1, "min_read_iops": 10}}))
    with pytest.raises(InvalidSpec):
        load_tiers(str(path))
    path.write_text(json.dumps({"bad": {"nonsense": 1}}))
    with pytest.raises(InvalidSpec):
        load_tiers(str(path))
