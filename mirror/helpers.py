"""Blocking work (connect + handshake, arbiter CAS) off the data-path loop.

Jobs run on a small thread pool; their results come back through a queue and
wake the loop through an eventfd, so the loop itself never blocks on them.
Arbiter writes run on a thread of their own, one at a time, in submission
order: the record then ends in the state the loop decided last (an in_sync
CAS still retrying cannot land after the out_of_sync CAS that followed it).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Helpers:
    def __init__(self, threads: int = 4):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mirror-helper")
        self._arbiter = ThreadPoolExecutor(1, thread_name_prefix="mirror-arbiter")
        self._done: queue.SimpleQueue[
            tuple[Callable[[Any, BaseException | None], None], Any, BaseException | None]
        ] = queue.SimpleQueue()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def submit(
        self, fn: Callable[[], Any], on_done: Callable[[Any, BaseException | None], None]
    ) -> None:
        self._pool.submit(self._wrap(fn, on_done))

    def submit_arbiter(
        self, fn: Callable[[], Any], on_done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Like submit, but on the arbiter's thread: one at a time, first in first out."""
        self._arbiter.submit(self._wrap(fn, on_done))

    def _wrap(
        self, fn: Callable[[], Any], on_done: Callable[[Any, BaseException | None], None]
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                res, err = fn(), None
            except BaseException as e:  # handed to the loop, which decides
                res, err = None, e
            self._done.put((on_done, res, err))
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

        return run

    def drain(self) -> None:
        """Run completions on the loop thread."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        while True:
            try:
                cb, res, err = self._done.get_nowait()
            except queue.Empty:
                return
            cb(res, err)

    def close(self) -> None:
        """Idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._arbiter.shutdown(wait=False, cancel_futures=True)
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
