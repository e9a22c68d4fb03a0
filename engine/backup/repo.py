"""A target's backup repository: what lies where in the bucket, and the rules for it.

Under the target's prefix:
  config                 format, the key's ID, and a value sealed with the key (so a wrong
                         key is told apart from damaged data)
  packs/HH/SHA256        packs: sealed blobs back to back, named by their SHA-256
  backups/ID             manifests (manifest.py), written last by each backup
  locks/upload-ID        an upload in progress (refreshed while it runs)
  locks/gc-ID            a garbage collection in progress
  deleted/ID             a deleted backup: an upload of that ID never completes

Garbage collection deletes packs no manifest references. It never races an upload: both
write their lock first and then look for the other kind; whoever sees a fresh lock of the
other kind withdraws (the GC answers Busy, the upload waits), so with the bucket's
read-after-write listing at least one of two that start together sees the other. A lock
not refreshed for LOCK_STALE_S belongs to a process that died and is ignored.

Deleting a backup marks it deleted first, then drops its manifest under a collection's
lock: an upload still running (on a node the controller cannot reach to stop it) holds its
lock, so the deletion waits for it (Busy), and an upload that takes its lock later sees
the mark and withdraws. So a deleted backup never reappears.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from engine.backup.crypto import BadBlob, Keys
from engine.backup.manifest import BlobLocation, Manifest
from engine.backup.s3 import Bucket
from engine.backup.targets import ObjectStore
from engine.errors import Busy, DataLoss, InvalidSpec, NotFound

log = logging.getLogger(__name__)

FORMAT = 1
KEY_CHECK = b"tandem-backup key check"
LOCK_STALE_S = 600.0
LOCK_REFRESH_S = 60.0


@dataclass(frozen=True)
class Lock:
    key: str
    kind: str  # "upload" or "gc"
    at: float


class Repository:
    def __init__(self, bucket: Bucket, keys: Keys, prefix: str, target_name: str,
                 lock_stale_s: float = LOCK_STALE_S):
        self.bucket = bucket
        self.keys = keys
        self.prefix = prefix
        self.target = target_name
        self.lock_stale_s = lock_stale_s

    @classmethod
    def open(cls, store: ObjectStore, *, create: bool = False,
             lock_stale_s: float = LOCK_STALE_S) -> Repository:
        """The target's repository, its key checked; created on first use if `create`."""
        repo = cls(Bucket(store), Keys(store.credentials.encryption_key), store.target.prefix,
                   store.target.name, lock_stale_s)
        repo._check_config(create)
        return repo

    # --- names -----------------------------------------------------------------------
    def pack_key(self, pack: str) -> str:
        return f"{self.prefix}packs/{pack[:2]}/{pack}"

    def manifest_key(self, backup_id: str) -> str:
        return f"{self.prefix}backups/{backup_id}"

    def deleted_key(self, backup_id: str) -> str:
        return f"{self.prefix}deleted/{backup_id}"

    def _config_key(self) -> str:
        return f"{self.prefix}config"

    # --- the key ---------------------------------------------------------------------
    def _check_config(self, create: bool) -> None:
        try:
            config = json.loads(self.bucket.get(self._config_key()))
        except NotFound:
            if not create:
                raise NotFound(f"target {self.target} holds no Tandem backups") from None
            sealed = self.keys.seal(KEY_CHECK, b"config")
            self.bucket.put(self._config_key(), json.dumps({
                "format": FORMAT, "key_id": self.keys.key_id,
                "key_check": base64.b64encode(sealed).decode()}).encode())
            return
        except ValueError:
            raise DataLoss(f"target {self.target}: its config object is damaged") from None
        if config.get("format") != FORMAT:
            raise InvalidSpec(f"target {self.target} holds backups of format "
                              f"{config.get('format')}, not {FORMAT}")
        try:
            opened = self.keys.open(base64.b64decode(config["key_check"]), b"config")
        except (BadBlob, KeyError, ValueError):
            opened = b""
        if opened != KEY_CHECK:
            raise InvalidSpec(f"the encryption key given (key id {self.keys.key_id}) is not "
                              f"the key of target {self.target}'s backups (key id "
                              f"{config.get('key_id', '?')}): refused")

    # --- packs and blobs -------------------------------------------------------------
    def write_pack(self, data: bytes) -> str:
        """Store a pack under its SHA-256; returns the name. A pack already there (same
        name, same length) is not sent again."""
        name = hashlib.sha256(data).hexdigest()
        key = self.pack_key(name)
        existing = self.bucket.head(key)
        if existing is None or existing.size_bytes != len(data):
            self.bucket.put(key, data)
        return name

    def read_pack_range(self, pack: str, start: int, end: int) -> bytes:
        try:
            return self.bucket.get(self.pack_key(pack), start, end)
        except NotFound:
            raise DataLoss(f"pack {pack} is missing from target {self.target} (or shorter "
                           "than its index says)") from None

    def open_blob(self, blob: bytes, loc: BlobLocation, sealed: bytes | memoryview) -> bytes:
        """The blob's plaintext, checked: authenticated by its seal, and its content
        address recomputed. DataLoss names the blob and its pack."""
        try:
            plain = self.keys.open(sealed, blob)
        except BadBlob as e:
            raise DataLoss(f"blob {blob.hex()} in pack {loc.pack} of target {self.target} "
                           f"is damaged ({e})") from None
        if len(plain) != loc.plain_bytes or self.keys.content_id(plain) != blob:
            raise DataLoss(f"blob {blob.hex()} in pack {loc.pack} of target {self.target} "
                           "does not match its hash")
        return plain

    # --- manifests -------------------------------------------------------------------
    def write_manifest(self, manifest: Manifest) -> int:
        manifest.check()
        sealed = self.keys.seal(manifest.encode(), b"backup/" + manifest.backup_id.encode())
        self.bucket.put(self.manifest_key(manifest.backup_id), sealed)
        return len(sealed)

    def read_manifest(self, backup_id: str) -> Manifest:
        """NotFound when the backup is not (or not yet completely) there."""
        sealed = self.bucket.get(self.manifest_key(backup_id))
        try:
            manifest = Manifest.decode(self.keys.open(sealed, b"backup/" + backup_id.encode()))
        except (BadBlob, ValueError, KeyError) as e:
            raise DataLoss(f"the manifest of backup {backup_id} on target {self.target} is "
                           f"damaged ({e})") from None
        if manifest.backup_id != backup_id:
            raise DataLoss(f"the manifest under backup {backup_id} names another backup")
        return manifest

    def has_manifest(self, backup_id: str) -> bool:
        return self.bucket.head(self.manifest_key(backup_id)) is not None

    def backup_ids(self) -> list[str]:
        start = len(self.manifest_key(""))
        return sorted(o.key[start:] for o in self.bucket.list(self.manifest_key("")))

    # --- locks -----------------------------------------------------------------------
    def take_lock(self, kind: str, owner: str) -> Lock:
        key = f"{self.prefix}locks/{kind}-{owner}"
        now = time.time()
        self.bucket.put(key, json.dumps({"at": now}).encode())
        return Lock(key, kind, now)

    def refresh_lock(self, lock: Lock) -> Lock:
        if time.time() - lock.at < LOCK_REFRESH_S:
            return lock
        now = time.time()
        self.bucket.put(lock.key, json.dumps({"at": now}).encode())
        return Lock(lock.key, lock.kind, now)

    def release_lock(self, lock: Lock) -> None:
        self.bucket.delete([lock.key])

    def fresh_locks(self, kind: str, but: Lock | None = None) -> list[str]:
        """Keys of the locks of `kind` held by live processes (not `but`)."""
        out = []
        now = time.time()
        for obj in self.bucket.list(f"{self.prefix}locks/{kind}-"):
            if but is not None and obj.key == but.key:
                continue
            if now - obj.modified_at < self.lock_stale_s:
                out.append(obj.key)
        return out

    def lock_upload(self, backup_id: str) -> Lock:
        """An upload's lock, once no garbage collection runs (Busy while one does);
        NotFound when the backup was deleted (its upload must not complete)."""
        lock = self.take_lock("upload", backup_id)
        if self.fresh_locks("gc"):
            self.release_lock(lock)
            raise Busy(f"a garbage collection runs on target {self.target}; the upload "
                       "waits for it")
        if self.bucket.head(self.deleted_key(backup_id)) is not None:
            self.release_lock(lock)
            raise NotFound(f"backup {backup_id} was deleted from target {self.target}: "
                           "not uploaded")
        return lock

    # --- deletion and garbage collection ---------------------------------------------
    def delete_backup(self, backup_id: str) -> None:
        """Mark the backup deleted, then drop its manifest and whatever data no other
        backup references (Busy while an upload runs: retry)."""
        self.bucket.put(self.deleted_key(backup_id), b"")
        self.collect_garbage(drop=backup_id)

    def collect_garbage(self, drop: str = "") -> tuple[int, int]:
        """Delete packs no manifest references (after the manifest of backup `drop`, if
        given); (packs, bytes) deleted. Busy while an upload runs; nothing is deleted if
        any manifest cannot be read."""
        lock = self.take_lock("gc", uuid.uuid4().hex)
        try:
            uploads = self.fresh_locks("upload")
            if uploads:
                raise Busy(f"an upload is in progress on target {self.target} "
                           f"({uploads[0].rsplit('/', 1)[-1]}): garbage collection waits "
                           "for it; retry")
            if drop:  # no upload can write it again now: its lock would be seen
                self.bucket.delete([self.manifest_key(drop)])
            referenced: set[str] = set()
            for backup_id in self.backup_ids():
                try:
                    referenced |= self.read_manifest(backup_id).packs()
                except NotFound:
                    continue  # deleted meanwhile
            unreferenced = [o for o in self.bucket.list(f"{self.prefix}packs/")
                            if o.key.rsplit("/", 1)[-1] not in referenced]
            self.bucket.delete([o.key for o in unreferenced])
            freed = sum(o.size_bytes for o in unreferenced)
            if unreferenced:
                log.info("target %s: deleted %d unreferenced packs (%d bytes)", self.target,
                         len(unreferenced), freed)
            return len(unreferenced), freed
        finally:
            self.release_lock(lock)
