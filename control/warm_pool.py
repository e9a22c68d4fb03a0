"""The executor the gRPC servers run their handlers on: few warm threads, more when they stall.

Measured on the control benchmark (CreateVolume+DeleteVolume, 8 clients, 2 cores): with
a 16-thread ThreadPoolExecutor, half of the driver's CPU went to the kernel (futex
wake-ups and task switches): each call woke an idle thread, and up to 16 threads then
passed the GIL back and forth at every SQLite statement and system call. With 2 threads
the same work cost 20-35% less CPU per call and ran 20-30% faster, because a thread that
finishes a call takes the next queued one without sleeping, and only two threads want the
GIL. A 2-thread pool alone would let a few slow calls (a mkfs, a node that does not
answer, a long snapshot-metadata stream) hold every other call up, Probe included.

So: `core` threads take calls, in order; a thread whose call has run for `slow_after_s`
is taken to be waiting (on a disk, a remote node, a lock) and stops counting, so the next
queued call gets another thread at once, up to `max_workers`. No call waits behind slow
ones longer than `slow_after_s`, and calls that wait for each other cannot deadlock (a
waiting call turns slow and lends its place). A call that waits on I/O (an fsync, a
group commit's turn, a round trip to etcd or a node: engine/waits.py) lends its place
after IO_GRACE_S already, so a slow disk neither idles the CPU nor keeps commits from
grouping. grpc.server takes any
Executor with submit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from engine import waits

CORE = 2  # threads taking calls while none is slow: the best of 1/2/4/8/16, measured
SLOW_AFTER_S = 0.1  # a call running longer is waiting, not computing
IO_GRACE_S = 0.005  # a call waiting on I/O longer lends its place (see wait_begins)


class WarmPool(concurrent.futures.Executor):
    def __init__(self, max_workers: int, core: int = CORE, slow_after_s: float = SLOW_AFTER_S,
                 name: str = "handler", clock: Callable[[], float] = time.monotonic):
        if not 1 <= core <= max_workers:
            raise ValueError(f"core {core} must be within 1..max_workers {max_workers}")
        self.max_workers = max_workers
        self.core = core
        self.slow_after_s = slow_after_s
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # idle workers wait here
        self._late = threading.Condition(self._lock)  # the watcher waits here
        self._queue: collections.deque[tuple[concurrent.futures.Future, Callable, tuple, dict]]
        self._queue = collections.deque()
        self._started: dict[int, float] = {}  # busy worker -> when its call began
        self._threads = 0
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a call, notified ones included
        self._notified = 0  # idle workers woken, not yet back at the queue
        self._starting = 0  # workers started, not yet at the queue
        self._watcher_parked = False  # waiting for a submit, no timeout
        self._shutdown = False
        self._watcher = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._watcher.start()

    # --- the Executor interface ------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if self._taking(self._clock()) < self.core:
                self._wake_one()
            elif self._watcher_parked:  # a busy thread takes it when done, or the
                self._late.notify()  # watcher lends one if they all turn slow
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._work.notify_all()
            self._late.notify_all()
        if wait:  # the calls queued before shutdown run first
            self._watcher.join()
            for worker in list(self._workers):
                worker.join()

    def busy(self) -> int:
        with self._lock:
            return len(self._started)

    def threads(self) -> int:
        with self._lock:
            return self._threads

    # --- inside, all with self._lock held ---------------------------------------------
    def _taking(self, now: float) -> int:
        """Threads that will take queued calls soon: busy with a young call, or waking."""
        young = sum(1 for t in self._started.values() if now - t < self.slow_after_s)
        return young + self._notified + self._starting

    def _wake_one(self) -> bool:
        """Wake an idle thread or start one; False when every thread is busy already (the
        first to finish takes the call)."""
        if self._idle > self._notified:
            self._notified += 1
            self._work.notify()
            return True
        if self._threads >= self.max_workers:
            return False
        self._threads += 1
        self._starting += 1
        worker = threading.Thread(target=self._worker, name=f"{self._name}-{self._threads}",
                                  daemon=True)
        self._workers.append(worker)
        worker.start()
        return True

    def _watch(self) -> None:
        with self._lock:
            while not self._shutdown:
                if not self._queue:
                    self._watcher_parked = True
                    self._late.wait()
                    self._watcher_parked = False
                    continue
                now = self._clock()
                lent = 0  # a busy call turned slow: lend its place, for each one
                while lent < len(self._queue) and self._taking(now) < self.core:
                    if not self._wake_one():
                        break
                    lent += 1
                young = [t for t in self._started.values() if now - t < self.slow_after_s]
                # until the next young call turns slow, but within IO_GRACE_S: a call may
                # begin an I/O wait meanwhile, and nothing wakes us for it
                timeout = min(young) + self.slow_after_s - now if young else self.slow_after_s
                self._late.wait(min(timeout, IO_GRACE_S))

    # --- engine/waits.py's Waiter, for this pool's worker threads ----------------------
    def wait_begins(self) -> float | None:
        """The running call waits on I/O (engine/waits.py: an fsync, a group commit, a
        round trip to etcd or a node): if the wait lasts IO_GRACE_S, the call stops
        counting and a queued call gets a thread, so that a slow disk does not idle the
        CPU (and commits still group: measured with fsyncs throttled to 15 ms, a 2-thread
        pool without this made half the pairs/s of a 16-thread pool at 32 clients; with
        it, as many). Quick waits (a fast disk) change nothing: waking another thread for
        each one cost more CPU than the wait. Returns what wait_ends restores."""
        me = threading.get_ident()
        with self._lock:
            started = self._started.get(me)
            if started is not None:  # (None: between calls)
                turns_slow = self._clock() + IO_GRACE_S
                self._started[me] = min(started, turns_slow - self.slow_after_s)
        return started

    def wait_ends(self, started: float | None) -> None:
        if started is not None:
            with self._lock:
                self._started[threading.get_ident()] = started

    def _worker(self) -> None:
        waits.set_waiter(self)
        me = threading.get_ident()
        starting = True
        while True:
            with self._lock:
                if starting:
                    self._starting -= 1
                    starting = False
                while not self._queue:
                    if self._shutdown:
                        return
                    self._idle += 1
                    self._work.wait()
                    self._idle -= 1
                    if self._notified:  # (shutdown's notify_all wakes the others)
                        self._notified -= 1
                future, fn, args, kwargs = self._queue.popleft()
                self._started[me] = self._clock()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as e:  # noqa: BLE001 - it belongs to the caller
                        future.set_exception(e)
                    else:
                        future.set_result(result)
            finally:
                del future, fn, args, kwargs
                with self._lock:
                    del self._started[me]


def fast_lane(servicer: Any, names: tuple[str, ...], workers: int = 2) -> Any:
    """Serve the servicer's methods `names` on threads of their own, through grpc's
    per-method pool (`experimental_thread_pool`): calls that answer from memory (Probe)
    never queue behind the others. Measured with 32 clients provisioning flat out: Probe
    p50 73-80 ms (p99 100-115) in the shared queue, 44 ms on the old 16-thread pool, and
    1.5-1.8 ms (p99 3.3-4.0) on its lane."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                 thread_name_prefix="fast-lane")
    for name in names:
        method = getattr(servicer, name)

        def call(request: Any, context: Any, method: Callable = method) -> Any:
            return method(request, context)

        call.experimental_thread_pool = pool  # type: ignore[attr-defined]
        setattr(servicer, name, call)
    return servicer
