"""Mutual TLS for the node agent API: certificates from files (a mounted Secret), reloaded
when they are rotated.

One CA signs every agent's and every controller's certificate; each side presents its own
and accepts only peers the CA signed. Kubernetes updates a mounted Secret by swapping a
symlink (`..data`), so a rotation shows as a change of the files' identity or mtime:
- the server (grpc.dynamic_ssl_server_credentials) is asked for its certificates at every
  new TLS handshake; it answers with new ones when the files changed, so new connections
  use them and established ones carry on;
- a client keeps a generation number; when the files changed it builds a new channel for
  its next call (control/agent_client.py), closing the old one.
Files are looked at no more than once per `check_interval_s`.

The agents' certificates name the service, not an address (nodes come and go, one Secret
serves them all): clients check the server's certificate against `server_name`
(default "tandem-agent") whatever address they dial.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import grpc

DEFAULT_SERVER_NAME = "tandem-agent"


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str  # the CA that signs every agent and controller
    cert_file: str  # this process's certificate (server and client auth)
    key_file: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate, key) PEM, read together."""
        out = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            with open(path, "rb") as f:
                out.append(f.read())
        return out[0], out[1], out[2]

    def stamp(self) -> tuple:
        """What changes when any of the files is replaced or rewritten."""
        stamps = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            st = os.stat(path)  # follows the Secret's symlinks to the current files
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)


class ReloadingTls:
    """The current PEM of a TlsFiles, re-read when the files change."""

    def __init__(self, files: TlsFiles, check_interval_s: float = 5.0):
        self.files = files
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._stamp = files.stamp()
        self._pem = files.read()
        self.generation = 0
        self._checked = time.monotonic()

    def current(self) -> tuple[int, tuple[bytes, bytes, bytes]]:
        """(generation, (CA, certificate, key)); the generation grows with each reload."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.check_interval_s:
                self._checked = now
                self._reload_if_changed()
            return self.generation, self._pem

    def _reload_if_changed(self) -> None:
        try:
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return
            pem = self.files.read()
        except OSError:
            return  # mid-rotation (a file missing for a moment): keep what we have
        self._stamp, self._pem = stamp, pem
        self.generation += 1

    # --- gRPC credentials -----------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """Require a client certificate the CA signed; new certificates at the first
        handshake after a rotation."""
        served = [self.generation]

        def config(pem: tuple[bytes, bytes, bytes]) -> grpc.ServerCertificateConfiguration:
            ca, cert, key = pem
            return grpc.ssl_server_certificate_configuration([(key, cert)],
                                                             root_certificates=ca)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            generation, pem = self.current()
            if generation == served[0]:
                return None  # unchanged: gRPC keeps the current configuration
            served[0] = generation
            return config(pem)

        return grpc.dynamic_ssl_server_credentials(config(self._pem), fetch,
                                                   require_client_authentication=True)

    @staticmethod
    def channel_credentials(pem: tuple[bytes, bytes, bytes]) -> grpc.ChannelCredentials:
        ca, cert, key = pem
        return grpc.ssl_channel_credentials(ca, key, cert)
