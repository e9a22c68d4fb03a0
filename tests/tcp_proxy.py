"""A TCP proxy on loopback that can lose traffic on purpose, for unknown-outcome tests.

    with TcpProxy("127.0.0.1:2379") as proxy:     # proxy.endpoint: where clients connect
        proxy.mode = "drop_replies"    # requests reach the server, answers never come back
        proxy.mode = "drop_requests"   # requests are swallowed, the server sees nothing
        proxy.reset()                  # close every connection (their streams are torn)
        proxy.refuse(3, b"HTTP/1.1 503 ...")  # the next 3 connections get that answer to
                                              # their first request, and are closed
        proxy.most_open                # the most connections open at once so far

A lost byte stream cannot resume mid-frame, so tests call reset() before forwarding again.
"""

from __future__ import annotations

import contextlib
import socket
import threading

MODES = ("forward", "drop_replies", "drop_requests")


class TcpProxy:
    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.forwarded_requests = 0  # bytes client -> server that reached the server
        self.refused = 0  # connections answered with the refusal
        self.most_open = 0  # the most client connections open at once
        self._refuse_next = 0
        self._refusal = b""
        self._clients: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._refuse_next > 0
                self._refuse_next -= refuse
                self.refused += refuse
                self._clients.add(client)
                self.most_open = max(self.most_open, len(self._clients))
            if refuse:
                threading.Thread(target=self._answer, args=(client,), daemon=True,
                                 name="proxy-refuse").start()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=2)
                server.settimeout(None)
            except OSError:
                self._close_pair(client)
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
            for src, dst, drop in ((client, server, "drop_requests"),
                                   (server, client, "drop_replies")):
                threading.Thread(target=self._pump, args=(src, dst, drop), daemon=True,
                                 name="proxy-pump").start()

    def refuse(self, count: int, answer: bytes) -> None:
        with self._lock:
            self._refuse_next, self._refusal = count, answer

    def _answer(self, client: socket.socket) -> None:
        try:
            client.recv(65536)  # the request's head; the server never sees it
            client.sendall(self._refusal)
        except OSError:
            pass
        finally:
            self._close_pair(client)

    def _pump(self, src: socket.socket, dst: socket.socket, drop_mode: str) -> None:
        try:
            while data := src.recv(65536):
                if self.mode == drop_mode:
                    continue
                dst.sendall(data)
                if drop_mode == "drop_requests":
                    self.forwarded_requests += len(data)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, *socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._sockets.discard(s)
                self._clients.discard(s)

    def reset(self) -> None:
        """Tear down every connection through the proxy and forward normally again."""
        self.mode = "forward"
        with self._lock:
            socks = list(self._sockets)
        self._close_pair(*socks)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self._listener.close()
        self.reset()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
