"""The replica service's front door: accept connections and run the key handshake for
all of them on one thread, so an unauthenticated peer costs a socket and a few bytes,
never a thread. Authenticated sockets are handed on (blocking) to on_peer.

- Caps: at most max_pending handshakes at a time and max_per_source from one address;
  when the descriptor limit is lower, a quarter of it and a quarter of that. A
  connection over a cap is reset at once.
- A handshake not finished within handshake_timeout_s is dropped.
- accept() failing never ends the loop: out of descriptors or memory (EMFILE, ENFILE,
  ENOBUFS, ENOMEM) it makes room (the oldest handshake of the address with the most)
  and leaves the listener alone for a while, backing off up to a second; a connection
  that died in the backlog (ECONNABORTED, EPROTO, ...) is just skipped.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

from . import auth

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 1.0
ACCEPTS_PER_WAKE = 64


class _Pending:
    __slots__ = ("sock", "source", "deadline", "nonce", "got")

    def __init__(self, sock: socket.socket, source: str, deadline: float, nonce: bytes):
        self.sock, self.source, self.deadline, self.nonce = sock, source, deadline, nonce
        self.got = bytearray()


class _RateLimited:
    """At most `burst` messages per `period_s`; the rest are counted and summarised."""

    def __init__(self, burst: int = 5, period_s: float = 10.0):
        self.burst, self.period_s = burst, period_s
        self.start, self.sent, self.dropped = 0.0, 0, 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.start > self.period_s:
            if self.dropped:
                log.warning("... and %d more like it", self.dropped)
            self.start, self.sent, self.dropped = now, 0, 0
        if self.sent < self.burst:
            self.sent += 1
            log.warning(msg, *args)
        else:
            self.dropped += 1


def _reset(sock: socket.socket) -> None:
    """Close with a reset: nothing lingers (TIME_WAIT, unsent data) for a refused peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Acceptor:
    def __init__(self, listener: socket.socket, key: bytes,
                 on_peer: Callable[[socket.socket, str], None], max_pending: int = 512,
                 max_per_source: int = 64, handshake_timeout_s: float = 5.0):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft // 4 < max_pending:
            # the descriptors are the limit: one address may take a quarter of what is left
            max_pending = max(4, soft // 4)
            max_per_source = min(max_per_source, max(2, max_pending // 4))
        self.max_pending = max(1, max_pending)
        self.max_per_source = max(1, min(max_per_source, self.max_pending))
        self.timeout_s = handshake_timeout_s
        self._listener = listener
        listener.setblocking(False)
        self._key = key
        self._on_peer = on_peer
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: dict[int, _Pending] = {}  # by fd, oldest first
        self._per_source: Counter[str] = Counter()
        self._stopping = False
        self._listening = False
        self._resume_at = 0.0
        self._backoff_s = BACKOFF_FIRST_S
        self._thread = threading.Thread(target=self._run, name="replica-accept", daemon=True)
        self._refused = _RateLimited()
        self._trouble = _RateLimited()
        self.stats = Counter[str]()  # accepted, refused_cap, refused_auth, timed_out, out_of_fds

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._listen(True)
        self._thread.start()

    def stop(self) -> None:
        """Idempotent: closes the listener and every pending handshake."""
        if self._stopping:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- the loop ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._once()
                except Exception:
                    # never end the loop (the service would stop accepting for good); out of
                    # descriptors, even a log line or a lazy import can fail
                    try:
                        log.exception("accept loop: unexpected error; going on")
                    except Exception:
                        pass
                    time.sleep(BACKOFF_MAX_S)
        finally:
            self._close_all()

    def _once(self) -> None:
        now = time.monotonic()
        if not self._listening and now >= self._resume_at:
            self._listen(True)
        for key, _ev in self._sel.select(self._timeout(now)):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fd == self._wake_r:
                try:
                    os.read(self._wake_r, 64)
                except OSError:
                    pass
            elif key.fd in self._pending:
                self._readable(self._pending[key.fd])
        self._expire(time.monotonic())

    def _timeout(self, now: float) -> float:
        t = 1.0
        if self._pending:
            t = min(t, next(iter(self._pending.values())).deadline - now)
        if not self._listening:
            t = min(t, self._resume_at - now)
        return max(0.0, t)

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._sel.register(self._listener, selectors.EVENT_READ)
        elif not on and self._listening:
            self._sel.unregister(self._listener)
        self._listening = on

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in OUT_OF_RESOURCES:
                    self.stats["out_of_fds"] += 1
                    self._make_room()
                    self._back_off(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                               errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                               errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH):
                    continue  # that connection died in the backlog; the next one may not
                self._back_off(e)  # unknown: keep the service alive, try again later
                return
            self._backoff_s = BACKOFF_FIRST_S
            self._admit(sock, addr[0])

    def _admit(self, sock: socket.socket, source: str) -> None:
        if (len(self._pending) >= self.max_pending
                or self._per_source[source] >= self.max_per_source):
            self.stats["refused_cap"] += 1
            self._refused.warning("refusing a connection from %s: %d handshakes pending "
                                  "(%d from it)", source, len(self._pending),
                                  self._per_source[source])
            _reset(sock)
            return
        try:
            sock.setblocking(False)
            hello, nonce = auth.server_hello()
            if sock.send(hello) != len(hello):
                raise BlockingIOError("hello did not fit the socket buffer")
            self._sel.register(sock, selectors.EVENT_READ)
        except OSError:
            _reset(sock)
            return
        self.stats["accepted"] += 1
        self._pending[sock.fileno()] = _Pending(sock, source,
                                                time.monotonic() + self.timeout_s, nonce)
        self._per_source[source] += 1

    def _readable(self, p: _Pending) -> None:
        need = auth.CLIENT_PROOF.size - len(p.got)
        try:
            chunk = p.sock.recv(need)
        except BlockingIOError:
            return
        except OSError:
            self._drop(p)
            return
        if not chunk:
            self._drop(p, reset=False)
            return
        p.got += chunk
        if len(p.got) < auth.CLIENT_PROOF.size:
            return
        try:
            answer = auth.server_verify(self._key, p.nonce, bytes(p.got))
            if p.sock.send(answer) != len(answer):
                raise BlockingIOError("answer did not fit the socket buffer")
        except auth.AuthFailed as e:
            self.stats["refused_auth"] += 1
            self._refused.warning("refused a peer from %s: %s", p.source, e)
            self._drop(p, reset=False)  # closed without another byte (docs/mirror.md)
            return
        except OSError:
            self._drop(p)
            return
        self._forget(p)
        try:
            p.sock.setblocking(True)
            self._on_peer(p.sock, p.source)
        except Exception:
            log.exception("handing over a connection from %s failed", p.source)
            _reset(p.sock)

    def _expire(self, now: float) -> None:
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.deadline > now:
                return
            self.stats["timed_out"] += 1
            self._drop(p)

    def _make_room(self) -> None:
        """Out of descriptors: the oldest handshake of the address with the most goes."""
        if not self._pending:
            return
        # no most_common(): it imports heapq lazily, and no file opens without descriptors
        source = max(self._per_source, key=self._per_source.__getitem__)
        p = next(p for p in self._pending.values() if p.source == source)
        self._drop(p)

    def _back_off(self, e: OSError) -> None:
        self._trouble.warning("accept: %s; pausing %.2fs (%d handshakes pending)", e,
                              self._backoff_s, len(self._pending))
        self._listen(False)
        self._resume_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def _forget(self, p: _Pending) -> None:
        fd = p.sock.fileno()
        self._pending.pop(fd, None)
        self._per_source[p.source] -= 1
        if self._per_source[p.source] <= 0:
            del self._per_source[p.source]
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending, reset: bool = True) -> None:
        self._forget(p)
        if reset:
            _reset(p.sock)
        else:
            p.sock.close()

    def _close_all(self) -> None:
        for p in list(self._pending.values()):
            self._drop(p)
        self._listen(False)
        try:
            self._listener.close()
        except OSError:
            pass
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
