"""The replica service's front door (mirror/acceptor.py) over loopback, no root needed:
the overall cap on pending handshakes across sources, and accept() failures other than
EMFILE (which tests/integration/test_mirror_faults.py provokes for real)."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from mirror import auth
from mirror.acceptor import Acceptor

KEY = b"a" * 32


class FailingListener:
    """A listening socket whose next accept() calls fail with the given errnos first, as
    the kernel's do when a connection dies in the backlog or the system runs out of files.
    (ENFILE cannot be provoked here without starving every process on the machine.)"""

    def __init__(self, sock: socket.socket, errnos: list[int]):
        self.sock, self.errnos = sock, list(errnos)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def close(self) -> None:
        self.sock.close()

    def accept(self):
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, errno.errorcode[code])
        return self.sock.accept()


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def start(listener, **kw) -> tuple[Acceptor, list[str]]:
    peers: list[str] = []
    acceptor = Acceptor(listener, KEY, lambda sock, source: (peers.append(source),
                                                               sock.close()), **kw)
    acceptor.start()
    return acceptor, peers


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))


def greeted(sock: socket.socket) -> bool:
    try:
        return len(auth.recv_exact(sock, auth.SERVER_HELLO.size)) > 0
    except (OSError, auth.AuthFailed):
        return False


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def test_the_overall_cap_holds_across_sources_and_frees_up(listener):
    """Many sources each under their own cap still never hold more than max_pending
    handshakes; once those time out, a new peer is served again."""
    port = listener.getsockname()[1]
    acceptor, peers = start(listener, max_pending=4, max_per_source=3,
                            handshake_timeout_s=0.5)
    silent: list[socket.socket] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            for _ in range(2):
                try:
                    silent.append(connect(port, source))
                except OSError:
                    pass  # reset over the cap before connect() returned
        wait_until(lambda: acceptor.stats["accepted"] + acceptor.stats["refused_cap"] >= 6)
        assert acceptor.pending == 4
        assert sum(greeted(s) for s in silent) == 4
        assert acceptor.stats["refused_cap"] == 2
        wait_until(lambda: acceptor.pending == 0)  # the silent ones timed out
        peer = connect(port, "127.0.0.5")
        auth.client_handshake(peer, KEY)
        peer.close()
        wait_until(lambda: peers == ["127.0.0.5"])
    finally:
        for s in silent:
            s.close()
        acceptor.stop()


@pytest.mark.parametrize("errnos", [
    [errno.ECONNABORTED, errno.EPROTO],  # connections that died in the backlog: skipped
    [errno.ENFILE],  # the system is out of files: back off, make room, go on
    [errno.ENOBUFS, errno.ENOMEM, errno.EMFILE],
    [errno.EINVAL],  # unknown: back off and go on, never end the loop
])
def test_accept_failures_never_end_the_loop(listener, errnos):
    port = listener.getsockname()[1]
    acceptor, peers = start(FailingListener(listener, errnos))
    try:
        sock = connect(port, "127.0.0.1")
        auth.client_handshake(sock, KEY)
        sock.close()
        wait_until(lambda: peers == ["127.0.0.1"])
        out_of_resources = sum(e in (errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE)
                               for e in errnos)
        assert acceptor.stats["out_of_fds"] == out_of_resources
        again = connect(port, "127.0.0.2")  # and the loop goes on serving
        auth.client_handshake(again, KEY)
        again.close()
        wait_until(lambda: peers == ["127.0.0.1", "127.0.0.2"])
    finally:
        acceptor.stop()
