"""A mirrored volume's write barrier on the node where it is attached (node side).

The controller takes a consistent copy of every replica of a mirrored volume (a snapshot,
a clone) between barrier() and resume() here:

- the volume's frontend runs here: its filesystem is frozen if it is mounted (the
  filesystem's own consistency, as for local snapshots: FIFREEZE writes everything out
  through the frontend), then the frontend's write barrier (mirror/core.py Barrier) holds
  every new write and flush, drains those in flight and syncs every replica. The answer
  names the replicas that are identical at that moment;
- nothing serves the volume here (attached, not staged yet): staging it is refused (Busy:
  the kubelet retries) until the barrier goes, so no frontend starts writing in between.

Nothing is held forever: the frontend lets go at its deadline by itself, a timer here
thaws the filesystem at the same moment, a stage hold ends at its time, and a freeze left
by a crash of this process is thawed at its next start (engine/freeze.py records it).
resume() answers whether the barrier held until then: when it did not, the controller
throws its copies away and tries again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from control.frontend_backend import FrontendBackend
from control.node_api import FrontendBarrier
from engine.node_engine import NodeEngine

log = logging.getLogger(__name__)


@dataclass
class _Held:
    answer: FrontendBarrier
    mount_point: str  # frozen until resume or the timer ("": none)
    timer: threading.Timer


class FrontendBarriers:
    def __init__(self, engine: NodeEngine, frontends: FrontendBackend):
        self.engine = engine
        self.frontends = frontends
        self._held: dict[tuple[str, str], _Held] = {}
        self._lock = threading.Lock()  # the table only (calls come with the volume's lock)

    def barrier(self, volume_id: str, token: str, hold_s: float) -> FrontendBarrier:
        """Called with the node's lock of the volume held (control/local_node.py)."""
        with self._lock:
            held = self._held.get((volume_id, token))
        if held is not None:
            return held.answer  # a repeat (the controller's retry after a lost answer)
        host = self.frontends.host
        if self.frontends.record(volume_id) is None or host.device(volume_id) is None:
            self.frontends.hold_stage(volume_id, token, hold_s)
            log.info("%s: no frontend runs here; staging waits for barrier %s (%.0f s)",
                     volume_id, token, hold_s)
            return FrontendBarrier(volume_id, token, running=False)
        mount_point = self.engine.volumes.mounted_staging_path(volume_id)
        if mount_point:
            self.engine.freezer.freeze(mount_point)  # its dirty data goes through the mirror
        try:
            got = host.barrier(volume_id, token, hold_s)
        except BaseException:
            if mount_point:
                self.engine.freezer.thaw(mount_point)
            raise
        if got is None:  # it stopped meanwhile: nothing writes, nothing to hold
            if mount_point:
                self.engine.freezer.thaw(mount_point)
            self.frontends.hold_stage(volume_id, token, hold_s)
            return FrontendBarrier(volume_id, token, running=False)
        replicas, generation = got
        answer = FrontendBarrier(volume_id, token, True, tuple(replicas), generation)
        timer = threading.Timer(hold_s, self._expire, (volume_id, token))
        timer.daemon = True
        timer.start()
        with self._lock:
            self._held[(volume_id, token)] = _Held(answer, mount_point, timer)
        log.info("%s: writes held for barrier %s (%s identical)", volume_id, token,
                 ", ".join(replicas))
        return answer

    def resume(self, volume_id: str, token: str) -> bool:
        with self._lock:
            held = self._held.pop((volume_id, token), None)
        if held is None:
            # not running here when it was raised (a stage hold), or this process restarted
            # meanwhile (its freeze was thawed at start: only the frontend's word counts)
            stage_held = self.frontends.release_stage(volume_id, token)
            return self.frontends.host.resume(volume_id, token) or stage_held
        held.timer.cancel()
        ok = self.frontends.host.resume(volume_id, token)
        if held.mount_point:
            self.engine.freezer.thaw(held.mount_point)
        return ok

    def _expire(self, volume_id: str, token: str) -> None:
        with self._lock:
            held = self._held.pop((volume_id, token), None)
        if held is not None and held.mount_point:
            log.warning("%s: barrier %s was not resumed in time: thawing %s", volume_id,
                        token, held.mount_point)
            self.engine.freezer.thaw(held.mount_point)
