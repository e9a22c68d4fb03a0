"""Follows the frontends in etcd: which serve now, and which vanished while serving.

A frontend advertises itself as `frontend/<volume_id>` = {node_id, generation, state:
"serving"} attached to its etcd lease (control/frontend_main.py); a clean stop rewrites
it as "stopped" without the lease. So a key that is DELETED while its last value said
"serving" is a lease that expired: the data path on that node died or was cut off.

The tracker lists the prefix, then watches from the listing's revision + 1. Whenever the
watch breaks (etcd compacted the history it needed, or every member was unreachable) it
lists again and compares: a key that was serving before and is absent now was lost in the
gap. A key written again (a restarted worker took a new lease) cancels its loss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from control.ha.decide import SERVING, Frontend, LostFrontend
from control.store import Compacted, Event, Store, Watch
from engine.errors import Unavailable

log = logging.getLogger(__name__)

FRONTEND = "frontend/"  # the prefix control/frontend_main.py writes under


class FrontendTracker:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self.changed = threading.Event()  # set on every loss and every return
        self._lock = threading.Lock()
        self._current: dict[str, Frontend] = {}
        self._lost: dict[str, LostFrontend] = {}
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()  # the first listing is in

    # -- what the controller reads ------------------------------------------------------------
    def view(self) -> tuple[tuple[LostFrontend, ...], dict[str, Frontend]]:
        with self._lock:
            return tuple(self._lost.values()), dict(self._current)

    def forget(self, volume_ids: Iterable[str]) -> None:
        """Stop tracking these losses (the decision found nothing more to do)."""
        with self._lock:
            for vid in volume_ids:
                self._lost.pop(vid, None)

    # -- feeding it ----------------------------------------------------------------------------
    def sync(self) -> int:
        """List the frontends; a key serving before and absent now was lost meanwhile.
        Returns the listing's revision."""
        listing = self.store.list_with_revision(FRONTEND)
        now = {}
        for key, got in listing.items:
            vid = key[len(FRONTEND):]
            now[vid] = Frontend.from_value(vid, got.value)
        with self._lock:
            for vid, before in self._current.items():
                if vid not in now and before.state == SERVING:
                    self._lose(before)
            for vid in now:
                self._lost.pop(vid, None)
            self._current = now
        self.synced.set()
        self.changed.set()
        return listing.revision

    def apply(self, event: Event) -> None:
        vid = event.key[len(FRONTEND):]
        with self._lock:
            if event.value is None:
                before = self._current.pop(vid, None)
                if before is not None and before.state == SERVING:
                    self._lose(before)
                    self.changed.set()
                return
            self._current[vid] = Frontend.from_value(vid, event.value.value)
            if self._lost.pop(vid, None) is not None:
                log.info("frontend of %s is back (%s on %s)", vid,
                         self._current[vid].state, self._current[vid].node_id)
                self.changed.set()

    def _lose(self, frontend: Frontend) -> None:
        log.warning("frontend of %s on %s (generation %d) lost its lease", frontend.volume_id,
                    frontend.node_id, frontend.generation)
        self._lost[frontend.volume_id] = LostFrontend(frontend, self.clock())

    # -- the background thread -----------------------------------------------------------------
    def start(self) -> FrontendTracker:
        self._thread = threading.Thread(target=self._run, name="frontend-tracker", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        pause = 0.2
        while not self._stop.is_set():
            try:
                revision = self.sync()
                watch = self.store.watch(FRONTEND, revision + 1)
                with self._lock:
                    self._watch = watch
                if self._stop.is_set():
                    watch.cancel()
                    return
                for event in watch:
                    self.apply(event)
                    pause = 0.2
            except (Compacted, Unavailable) as e:
                log.warning("frontend watch broke (%s); listing again", e)
            except Exception:  # keep following: a dead tracker would stop every failover
                log.exception("frontend tracker failed; listing again")
            self._stop.wait(pause)
            pause = min(pause * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
