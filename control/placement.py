"""Where a new volume goes: a node inside the requested topology with room for its bytes
and its guaranteed IOPS, preferred topologies first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from control import policy, topology
from control.node_api import NodeInfo
from control.volume_index import VolumeIndex
from engine.errors import OutOfCapacity
from engine.qos.tiers import QosSpec


@dataclass(frozen=True)
class Constraints:
    requisite: tuple[dict[str, str], ...] = ()
    preferred: tuple[dict[str, str], ...] = ()
    pinned_node: str = ""  # a local source's node: clones and restores stay beside it


def available_bytes(info: NodeInfo, index: VolumeIndex, overcommit_ratio: float) -> int:
    return policy.thin_available_bytes(info.free_bytes, info.reserve_bytes, overcommit_ratio,
                                       index.provisioned_bytes(info.node_id))


def room_problem(info: NodeInfo, index: VolumeIndex, overcommit_ratio: float, size: int,
                 qos: QosSpec) -> str:
    """Why the volume cannot go on the node now ('' when it can)."""
    available = available_bytes(info, index, overcommit_ratio)
    if size > available:
        return f"{size} bytes asked, {available} available on {info.node_id}"
    if qos.min_iops and not policy.can_place(info.iops_capacity,
                                             index.guaranteed(info.node_id), qos):
        return (f"{qos.min_iops} guaranteed IOPS asked, not free on {info.node_id} "
                f"(capacity {info.iops_capacity})")
    return ""


def choose_node(nodes: Sequence[NodeInfo], index: VolumeIndex, overcommit_ratio: float,
                size: int, qos: QosSpec, constraints: Constraints) -> NodeInfo:
    candidates = [n for n in nodes
                  if not constraints.pinned_node or n.node_id == constraints.pinned_node]
    if constraints.requisite:
        candidates = [n for n in candidates
                      if topology.matches_any(n.node_id, n.zone, constraints.requisite)]
    if not candidates:
        raise OutOfCapacity("no reachable node matches the volume's accessibility requirements")
    ordered = [n for t in constraints.preferred for n in candidates
               if topology.matches(n.node_id, n.zone, t)] + list(candidates)
    problems = []
    seen = set()
    for node in ordered:  # preferred first, each node once
        if node.node_id in seen:
            continue
        seen.add(node.node_id)
        problem = room_problem(node, index, overcommit_ratio, size, qos)
        if not problem:
            return node
        problems.append(problem)
    raise OutOfCapacity("; ".join(problems))


def choose_replicas(nodes: Sequence[NodeInfo], index: VolumeIndex, overcommit_ratio: float,
                    size: int, qos: QosSpec, constraints: Constraints,
                    count: int) -> list[NodeInfo]:
    """`count` nodes in distinct zones for a mirrored volume's replicas, each with room for
    the bytes and the guaranteed minimum (both are paid on every replica): one in the first
    preferred topology's zone (the pod's), the others in the requisite topology's zones
    first. Requisite says where the volume must be reachable from, not where every copy
    lives: when it names fewer zones than there are replicas (the provisioner's
    --strict-topology names one), the rest go to other zones, and the volume is reachable
    from those too (the pod can fail over there)."""
    problems: list[str] = [f"{n.node_id} serves no replicas (no replica service: "
                           "--replica-listen unset, or a backend that cannot hold them)"
                           for n in nodes if not n.replica_address]
    nodes = [n for n in nodes if n.replica_address]
    inside = [n for n in nodes if not constraints.requisite
              or topology.matches_any(n.node_id, n.zone, constraints.requisite)]
    inside_ids = {n.node_id for n in inside}
    by_zone: dict[str, list[NodeInfo]] = {}
    for node in nodes:
        problem = room_problem(node, index, overcommit_ratio, size, qos)
        if problem:
            problems.append(problem)
        else:
            by_zone.setdefault(node.zone, []).append(node)
    for zone_nodes in by_zone.values():  # requisite nodes first, then the roomiest
        zone_nodes.sort(key=lambda n: (n.node_id not in inside_ids,
                                       -available_bytes(n, index, overcommit_ratio)))
    preferred_zones = [z for t in constraints.preferred for z in
                       {n.zone for n in inside if topology.matches(n.node_id, n.zone, t)}]
    if preferred_zones and preferred_zones[0] not in by_zone:
        raise OutOfCapacity(
            f"no node in zone {preferred_zones[0]} (the pod's) has room for a replica: "
            + ("; ".join(problems) or "no reachable node there"))
    inside_zones = {n.zone for n in inside}

    def rank(zone: str) -> tuple[bool, int]:
        best = by_zone[zone][0]
        return (best.node_id not in inside_ids,
                -available_bytes(best, index, overcommit_ratio))
    order = list(dict.fromkeys(preferred_zones + sorted(by_zone, key=rank)))
    chosen = [by_zone[z][0] for z in order if z in by_zone][:count]
    if not any(n.node_id in inside_ids for n in chosen):
        raise OutOfCapacity(
            f"no node of the zones asked for ({', '.join(sorted(inside_zones)) or 'none'}) "
            "has room for a replica" + (f": {'; '.join(problems)}" if problems else ""))
    if len(chosen) < count:
        raise OutOfCapacity(
            f"{count} replicas need {count} zones with room; found {len(chosen)} "
            f"(zones known: {', '.join(sorted({n.zone for n in nodes})) or 'none'})"
            + (f"; {'; '.join(problems)}" if problems else ""))
    return chosen


def replica_capacity(nodes: Sequence[NodeInfo], index: VolumeIndex, overcommit_ratio: float,
                     segment_zones: set[str], count: int) -> int:
    """GetCapacity of a segment for `count` replicas: the smaller of what the segment's
    zone can hold and the (count-1)th best of the other zones (a replica goes to each)."""
    best: dict[str, int] = {}
    for n in nodes:
        if not n.replica_address:  # serves no replicas (an NVMe node, say)
            continue
        best[n.zone] = max(best.get(n.zone, 0), available_bytes(n, index, overcommit_ratio))
    local = max((best.get(z, 0) for z in segment_zones), default=0)
    others = sorted((b for z, b in best.items() if z not in segment_zones), reverse=True)
    if count <= 1:
        return local
    if len(others) < count - 1:
        return 0
    return min(local, others[count - 2])
