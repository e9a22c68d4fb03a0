"""The nodes the controller knows, each behind the node API.

All-in-one: one in-process node registered at start. Cluster: node agents register
themselves in the store (control/registration.py) and the registry holds a client per
node, with the figures the node registered (pool, IOPS capacity), so placement needs no
call to any node. An unknown node and an unreachable one get one answer each,
everywhere: NotFound where the CSI spec asks about a node by ID (ControllerPublish),
Unavailable where a volume's work needs it.
"""

from __future__ import annotations

import threading
import time

from control.node_api import NodeApi, NodeInfo
from engine.errors import NotFound, Unavailable

INFO_TTL_S = 1.0  # pool usage changes slowly; one statvfs (or RPC) per node per second


class NodeRegistry:
    def __init__(self, info_ttl_s: float = INFO_TTL_S):
        self._nodes: dict[str, NodeApi] = {}
        self._infos: dict[str, tuple[float, NodeInfo]] = {}
        self._registered: dict[str, NodeInfo] = {}  # what nodes published of themselves
        self._lock = threading.Lock()
        self._ttl = info_ttl_s

    def add(self, node: NodeApi, info: NodeInfo | None = None) -> None:
        """info: the node's own registered figures, used instead of asking it."""
        with self._lock:
            self._nodes[node.node_id] = node
            self._infos.pop(node.node_id, None)
            self._registered.pop(node.node_id, None)
            if info is not None:
                self._registered[node.node_id] = info

    def set_registered(self, info: NodeInfo) -> None:
        """Newer figures a known node published."""
        with self._lock:
            if info.node_id in self._nodes:
                self._registered[info.node_id] = info

    def remove(self, node_id: str) -> NodeApi | None:
        with self._lock:
            self._infos.pop(node_id, None)
            self._registered.pop(node_id, None)
            return self._nodes.pop(node_id, None)

    def get(self, node_id: str) -> NodeApi | None:
        return self._nodes.get(node_id)

    def known(self, node_id: str) -> bool:
        return node_id in self._nodes

    def require(self, node_id: str) -> NodeApi:
        """The node that holds a volume's storage; Unavailable when it cannot be reached."""
        node = self._nodes.get(node_id)
        if node is None:
            raise Unavailable(f"node {node_id} is not reachable; retry once it is back")
        return node

    def require_known(self, node_id: str) -> NodeApi:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not known")
        return node

    def ids(self) -> list[str]:
        return sorted(self._nodes)

    def info(self, node_id: str, *, fresh: bool = False) -> NodeInfo:
        """The node's pool and capacity: its registered figures, or asked and cached for
        a second; `fresh` asks the node now."""
        if not fresh:
            registered = self._registered.get(node_id)
            if registered is not None and node_id in self._nodes:
                return registered
        now = time.monotonic()
        cached = self._infos.get(node_id)
        if cached is not None and not fresh and now - cached[0] < self._ttl:
            return cached[1]
        info = self.require(node_id).info()
        self._infos[node_id] = (now, info)
        return info

    def infos(self) -> list[NodeInfo]:
        """Every reachable node's info (a node that fails to answer is left out)."""
        out = []
        for node_id in self.ids():
            try:
                out.append(self.info(node_id))
            except Unavailable:
                continue
        return out

    def forget_info(self, node_id: str) -> None:
        self._infos.pop(node_id, None)
