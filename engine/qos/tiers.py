"""Performance tiers: the contract between StorageClass/VolumeAttributesClass and the node.

A volume's QoS comes from its parameters: `tier: gold` picks a named tier, and explicit
numbers (`maxReadIops`, ...) override single fields of it. `mutable_parameters`
(VolumeAttributesClass) override `parameters` (StorageClass). Zero means "no limit"
for a max and "no guarantee" for a min. MB/s are decimal (10^6 bytes per second).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidSpec

TIER_KEY = "tier"

# parameter key -> QosSpec field
NUMERIC_KEYS: dict[str, str] = {
    "minReadIops": "min_read_iops",
    "minWriteIops": "min_write_iops",
    "maxReadIops": "max_read_iops",
    "maxWriteIops": "max_write_iops",
    "maxReadMBps": "max_read_mbps",
    "maxWriteMBps": "max_write_mbps",
}
QOS_KEYS = frozenset({TIER_KEY, *NUMERIC_KEYS})

# Far beyond any single device today; rejects typos such as an extra dozen zeros.
_MAX_NUMBER = 100_000_000


@dataclass(frozen=True)
class QosSpec:
    """Limits and guarantees of one volume (or one named tier)."""

    name: str = ""  # tier name, "" when none was asked for
    min_read_iops: int = 0
    min_write_iops: int = 0
    max_read_iops: int = 0
    max_write_iops: int = 0
    max_read_mbps: int = 0
    max_write_mbps: int = 0

    @property
    def min_iops(self) -> int:
        """Guaranteed IOPS the node must reserve for this volume."""
        return self.min_read_iops + self.min_write_iops

    @property
    def limited(self) -> bool:
        return any(
            (self.max_read_iops, self.max_write_iops, self.max_read_mbps, self.max_write_mbps)
        )

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True)  # flat: asdict's deep copy is not needed

    @classmethod
    def from_json(cls, text: str) -> QosSpec:
        return cls(**json.loads(text)) if text else cls()

    def validate(self) -> QosSpec:
        for field in dataclasses.fields(self):
            if field.name == "name":
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 0 or value > _MAX_NUMBER:
                raise InvalidSpec(f"{field.name} must be an integer in 0..{_MAX_NUMBER}")
        for kind in ("read_iops", "write_iops"):
            lo, hi = getattr(self, f"min_{kind}"), getattr(self, f"max_{kind}")
            if hi and lo > hi:
                raise InvalidSpec(f"min_{kind} ({lo}) is above max_{kind} ({hi})")
        return self


DEFAULT_TIERS: dict[str, QosSpec] = {
    "gold": QosSpec("gold", 2000, 2000, 20000, 20000, 800, 800),
    "silver": QosSpec("silver", 500, 500, 5000, 5000, 200, 200),
    "bronze": QosSpec("bronze", 0, 0, 1000, 1000, 50, 50),
}


def _parse_number(key: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidSpec(f"parameter {key}={raw!r} is not a whole number") from None
    if value < 0 or value > _MAX_NUMBER:
        raise InvalidSpec(f"parameter {key}={raw!r} is outside 0..{_MAX_NUMBER}")
    return value


def resolve_qos(
    parameters: Mapping[str, str],
    mutable_parameters: Mapping[str, str] | None = None,
    tiers: Mapping[str, QosSpec] = DEFAULT_TIERS,
) -> QosSpec:
    """The volume's QoS from its (already key-checked) parameters; InvalidSpec if wrong."""
    merged = {k: v for k, v in parameters.items() if k in QOS_KEYS}
    merged.update({k: v for k, v in (mutable_parameters or {}).items() if k in QOS_KEYS})
    spec = QosSpec()
    tier_name = merged.get(TIER_KEY)
    if tier_name is not None:
        if tier_name not in tiers:
            known = ", ".join(sorted(tiers))
            raise InvalidSpec(f"unknown tier {tier_name!r} (known: {known})")
        spec = tiers[tier_name]
    overrides: dict[str, Any] = {
        field: _parse_number(key, merged[key])
        for key, field in NUMERIC_KEYS.items()
        if key in merged
    }
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    return spec.validate()


def load_tiers(path: str) -> dict[str, QosSpec]:
    """Tiers from a JSON file: {"gold": {"max_read_iops": 20000, ...}, ...}."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not raw:
        raise InvalidSpec(f"{path}: expected a JSON object of tiers")
    tiers = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise InvalidSpec(f"{path}: tier {name!r} must be an object")
        try:
            tiers[name] = QosSpec(name=name, **fields).validate()
        except TypeError as e:
            raise InvalidSpec(f"{path}: tier {name!r}: {e}") from None
    return tiers
