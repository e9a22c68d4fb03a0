"""Each replica of a mirrored volume as an operator sees it, from three records: the
arbiter's (in sync or not), the serving frontend's report (connected, a resync's or a
rebuild's progress: control/frontend_main.py StatusReporter) and the node's registration
(gone with its lease: node down). One reading for the volume condition (ListVolumes,
ControllerGetVolume) and for `tandem-admin replicas`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from control.node_api import Condition
from control.records import VolumeRecord

IN_SYNC = "in_sync"


@dataclass(frozen=True)
class ReplicaReport:
    node_id: str
    zone: str
    state: str  # the arbiter's: in_sync, out_of_sync... ("unknown": no record yet)
    node_up: bool
    connected: bool | None = None  # None: no frontend serves the volume
    resync_done_bytes: int = 0
    resync_total_bytes: int = 0  # > 0 while the frontend copies to it (resync or rebuild)

    @property
    def resync_percent(self) -> int | None:
        if self.state == IN_SYNC or not self.resync_total_bytes:
            return None
        return min(99, self.resync_done_bytes * 100 // self.resync_total_bytes)

    @property
    def summary(self) -> str:
        percent = self.resync_percent
        text = self.state if percent is None else f"resyncing {percent}%"
        return text if self.node_up else f"{text}, node down"

    @property
    def healthy(self) -> bool:
        return self.node_up and self.state == IN_SYNC

    def to_dict(self) -> dict:
        return {**asdict(self), "resync_percent": self.resync_percent, "summary": self.summary}


def replica_reports(vol: VolumeRecord, states: dict[str, str], frontend: dict[str, dict],
                    node_up: Callable[[str], bool]) -> list[ReplicaReport]:
    """states: the arbiter's record (Mirrors.replica_states); frontend: the serving
    frontend's view by node (Mirrors.frontend_view, {} when none serves)."""
    reports = []
    for r in vol.replicas:
        seen = frontend.get(r.node_id)
        view = seen or {}
        resyncing = view.get("state") == "resyncing"
        reports.append(ReplicaReport(
            node_id=r.node_id, zone=r.zone, state=states.get(r.node_id, "unknown"),
            node_up=node_up(r.node_id),
            connected=None if seen is None else bool(view.get("connected")),
            resync_done_bytes=int(view.get("resync_done_bytes") or 0) if resyncing else 0,
            resync_total_bytes=int(view.get("resync_total_bytes") or 0) if resyncing else 0))
    return reports


def condition(reports: list[ReplicaReport]) -> Condition:
    return Condition(not all(r.healthy for r in reports),
                     "replicas: " + "; ".join(f"{r.node_id} ({r.zone}): {r.summary}"
                                             for r in reports))
