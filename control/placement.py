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
