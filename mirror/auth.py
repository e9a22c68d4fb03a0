"""Mutual shared-key handshake (HMAC-SHA256 challenge-response).

Server speaks first with a nonce; the client proves the key over both nonces;
only then does the server prove it back. A client without the key gets a
nonce and a closed socket, nothing else. Messages after the handshake are not
MACed: the threat model is the unauthenticated client (Longhorn's
CVE-2021-36780), not an on-path attacker; TLS can wrap the socket later.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

from engine.errors import Unavailable

from . import wire

NONCE_BYTES = 32
SERVER_HELLO = struct.Struct("<4sHH32s")  # magic, version, reserved, nonce
CLIENT_PROOF = struct.Struct("<4sHH32s32s")  # magic, version, reserved, nonce, mac
MAC_BYTES = 32


class AuthFailed(Unavailable):
    """The peer does not hold the key, or speaks another protocol version."""


def _mac(key: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, b"tandem-mirror " + label + a + b, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AuthFailed("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def server_hello() -> tuple[bytes, bytes]:
    """The server's first message and its nonce (for servers that do the handshake
    themselves, without blocking: send the message, collect CLIENT_PROOF.size bytes,
    then server_verify)."""
    nonce_s = os.urandom(NONCE_BYTES)
    return SERVER_HELLO.pack(b"TDMR", wire.PROTOCOL_VERSION, 0, nonce_s), nonce_s


def server_verify(key: bytes, nonce_s: bytes, proof: bytes) -> bytes:
    """Check the client's proof; returns the server's answer. Raises AuthFailed (the
    caller closes the socket without a word)."""
    magic, version, _, nonce_c, mac_c = CLIENT_PROOF.unpack(proof)
    if magic != b"TDMC" or version != wire.PROTOCOL_VERSION:
        raise AuthFailed(f"bad client hello (version {version})")
    if not hmac.compare_digest(mac_c, _mac(key, b"client", nonce_s, nonce_c)):
        raise AuthFailed("client failed the key check")
    return _mac(key, b"server", nonce_c, nonce_s)


def server_handshake(sock: socket.socket, key: bytes) -> None:
    """Blocking form. Raises AuthFailed; the caller closes the socket without a word."""
    hello, nonce_s = server_hello()
    sock.sendall(hello)
    sock.sendall(server_verify(key, nonce_s, recv_exact(sock, CLIENT_PROOF.size)))


def client_handshake(sock: socket.socket, key: bytes) -> None:
    magic, version, _, nonce_s = SERVER_HELLO.unpack(recv_exact(sock, SERVER_HELLO.size))
    if magic != b"TDMR" or version != wire.PROTOCOL_VERSION:
        raise AuthFailed(f"bad server hello (version {version})")
    nonce_c = os.urandom(NONCE_BYTES)
    mac_c = _mac(key, b"client", nonce_s, nonce_c)
    sock.sendall(CLIENT_PROOF.pack(b"TDMC", wire.PROTOCOL_VERSION, 0, nonce_c, mac_c))
    if not hmac.compare_digest(recv_exact(sock, MAC_BYTES), _mac(key, b"server", nonce_c, nonce_s)):
        raise AuthFailed("server failed the key check")


def load_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 16:
        raise AuthFailed(f"key in {path} is shorter than 16 bytes")
    return key
