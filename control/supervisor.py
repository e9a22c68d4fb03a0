"""The node agent's watch over its data-path processes.

The replica service and the frontends' workers run in processes of their own so that they
outlive the agent (control/node_mirror.py). The other side of that choice: when one of
them dies on its own (a bug, the OOM killer), nobody else restarts it. While the agent
lives, this thread checks every few seconds and restarts what died; when the agent
itself restarts, it adopts or restarts them at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, checks: Sequence[Callable[[], object]], interval_s: float = 2.0):
        self.checks = list(checks)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="data-path-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def run_once(self) -> None:
        for check in self.checks:
            try:
                check()
            except Exception:  # one failed check must not end the watch over the others
                log.exception("data-path supervision: %s failed", check)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
