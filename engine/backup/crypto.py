"""Per-blob compression and authenticated encryption, and keyed content addresses.

Every blob (a piece of volume data, or a manifest) is compressed with zstd when that
makes it smaller, then sealed with AES-256-GCM under a fresh 96-bit random nonce; the
blob's name is bound in as associated data, so a blob moved to another name does not
open. Content addresses are HMAC-SHA256 of the plaintext under a key of their own: equal
data gets one address (deduplication) without the bucket learning plain SHA-256 sums of
the volume's content. Both keys derive (HKDF-SHA256) from the target's encryption key.

Sealed blob layout: nonce (12 bytes) || AES-GCM(flag byte || payload) (payload + 16-byte
tag); flag 0: raw, 1: zstd.
"""

from __future__ import annotations

import hmac
import os
import threading

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES, TAG_BYTES = 12, 16
OVERHEAD_BYTES = NONCE_BYTES + 1 + TAG_BYTES
RAW, ZSTD = 0, 1
ZSTD_LEVEL = 3
MAX_BLOB_BYTES = 64 * 1024 * 1024  # refuse to decompress anything larger (a bad blob)


class BadBlob(Exception):
    """A sealed blob did not open: wrong key, or the bytes were changed."""


def _derive(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"tandem-backup",
                info=b"tandem-backup/v1/" + purpose).derive(material)


class Keys:
    def __init__(self, key_material: str):
        material = key_material.encode()
        self._aead = AESGCM(_derive(material, b"encrypt"))
        self._mac_key = _derive(material, b"content-id")
        # names the key without revealing it: a bucket's config records which key it has
        self.key_id = _derive(material, b"key-id")[:8].hex()
        self._local = threading.local()  # zstd contexts are not shared between threads

    def __repr__(self) -> str:
        return f"Keys(key_id={self.key_id})"

    def content_id(self, data: bytes | memoryview) -> bytes:
        return hmac.digest(self._mac_key, data, "sha256")

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        pair = getattr(self._local, "zstd", None)
        if pair is None:
            pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
            self._local.zstd = pair
        return pair

    def seal(self, plaintext: bytes | memoryview, name: bytes) -> bytes:
        packed = self._zstd()[0].compress(plaintext)
        if len(packed) < len(plaintext):
            body = bytes([ZSTD]) + packed
        else:
            body = bytes([RAW]) + bytes(plaintext)
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, body, name)

    def open(self, sealed: bytes | memoryview, name: bytes) -> bytes:
        sealed = bytes(sealed)
        if len(sealed) < OVERHEAD_BYTES:
            raise BadBlob("too short")
        try:
            body = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], name)
        except InvalidTag:
            raise BadBlob("authentication failed") from None
        if body[0] == RAW:
            return body[1:]
        if body[0] == ZSTD:
            try:
                return self._zstd()[1].decompress(body[1:], max_output_size=MAX_BLOB_BYTES)
            except zstandard.ZstdError as e:
                raise BadBlob(f"decompression failed: {e}") from None
        raise BadBlob(f"unknown encoding {body[0]}")
