"""Topology segments: how a node (and so a volume placed on it) is described to the CO."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TOPOLOGY_NODE_KEY = "topology.tandem.csi.dev/node"
TOPOLOGY_ZONE_KEY = "topology.tandem.csi.dev/zone"
DEFAULT_ZONE = "default"

Segments = Mapping[str, str]


def node_segments(node_id: str, zone: str) -> dict[str, str]:
    return {TOPOLOGY_NODE_KEY: node_id, TOPOLOGY_ZONE_KEY: zone}


def matches(node_id: str, zone: str, segments: Segments) -> bool:
    """Does the node lie inside `segments` (every key given must match)?"""
    mine = node_segments(node_id, zone)
    return all(mine.get(k) == v for k, v in segments.items())


def matches_any(node_id: str, zone: str, topologies: Iterable[Segments]) -> bool:
    return any(matches(node_id, zone, t) for t in topologies)
