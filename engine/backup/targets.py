"""Backup targets (where backups go) and the credentials to reach them.

A target is a name an operator gives to (endpoint, bucket, prefix) in the driver's
`--backup-targets` file; a VolumeSnapshotClass names it (`backupTarget: NAME`). The
credentials and the encryption key never sit in that file: they come from a Secret, passed
by the sidecars as the request's `secrets` (snapshotter secrets for backups, provisioner
secrets for restores), or read from a directory the Secret is mounted at (`secretsDir`,
optional) for the calls whose request carries none.

A backup's snapshot ID names the target and the backup, never an endpoint, so another
cluster whose targets file gives the same name for the same bucket resolves it:
`bkp:<target>:<32 hex digits>` (at most 100 bytes; CSI allows 128).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field

from engine.errors import InvalidSpec, Precondition

# keys of the Secret (and of the files in secretsDir)
ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN = "accessKeyId", "secretAccessKey", "sessionToken"
ENCRYPTION_KEY = "encryptionKey"
MIN_KEY_CHARS = 32  # `openssl rand -base64 32` gives 44

TARGET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
BACKUP_ID = re.compile(r"^bkp:([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?):([0-9a-f]{32})$")


@dataclass(frozen=True)
class BackupRef:
    """A backup, as its snapshot ID names it."""

    target: str
    backup_id: str  # 32 hex digits: the manifest's name in the bucket

    @property
    def snapshot_id(self) -> str:
        return f"bkp:{self.target}:{self.backup_id}"

    @classmethod
    def new(cls, target: str) -> BackupRef:
        return cls(target, uuid.uuid4().hex)


def parse_snapshot_id(snapshot_id: str) -> BackupRef | None:
    m = BACKUP_ID.match(snapshot_id)
    return BackupRef(m.group(1), m.group(3)) if m else None


@dataclass(frozen=True)
class Credentials:
    """What the Secret holds. Never printed: repr hides every field."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    encryption_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)

    @classmethod
    def from_secrets(cls, secrets: dict[str, str], where: str) -> Credentials:
        missing = [k for k in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, ENCRYPTION_KEY)
                   if not secrets.get(k)]
        if missing:
            raise InvalidSpec(f"{where} lacks {', '.join(missing)}")
        if len(secrets[ENCRYPTION_KEY]) < MIN_KEY_CHARS:
            raise InvalidSpec(f"{where}: {ENCRYPTION_KEY} must hold at least {MIN_KEY_CHARS} "
                              "characters (e.g. `openssl rand -base64 32`)")
        return cls(secrets[ACCESS_KEY_ID], secrets[SECRET_ACCESS_KEY], secrets[ENCRYPTION_KEY],
                   secrets.get(SESSION_TOKEN, ""))


@dataclass(frozen=True)
class Target:
    """One entry of the targets file: where a target's backups live."""

    name: str
    endpoint: str  # https://host:port (or http:// on a trusted network)
    bucket: str
    prefix: str = ""  # "" or a path ending in "/": several clusters may share a bucket
    region: str = "us-east-1"
    ca_bundle: str = ""  # a CA file for a private endpoint's certificate
    secrets_dir: str = ""  # a mounted Secret, for calls that carry no secrets


@dataclass(frozen=True)
class ObjectStore:
    """A target with its credentials: all a node or the controller needs to reach it."""

    target: Target
    credentials: Credentials = field(repr=False)


def _target(name: str, spec: object) -> Target:
    if not TARGET_NAME.match(name):
        raise InvalidSpec(f"backup target name {name!r}: lowercase letters, digits and '-', "
                          "at most 63")
    if not isinstance(spec, dict):
        raise InvalidSpec(f"backup target {name!r} must be an object")
    known = {"endpoint", "bucket", "prefix", "region", "caBundle", "secretsDir"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise InvalidSpec(f"backup target {name!r}: unknown keys {', '.join(unknown)}")
    endpoint, bucket = spec.get("endpoint", ""), spec.get("bucket", "")
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise InvalidSpec(f"backup target {name!r}: endpoint must be an http(s) URL")
    if not isinstance(bucket, str) or not bucket:
        raise InvalidSpec(f"backup target {name!r}: bucket is required")
    prefix = str(spec.get("prefix", "")).strip("/")
    return Target(name, endpoint.rstrip("/"), bucket, prefix + "/" if prefix else "",
                  str(spec.get("region", "us-east-1")), str(spec.get("caBundle", "")),
                  str(spec.get("secretsDir", "")))


class Targets:
    """The targets file, read once at start-up."""

    def __init__(self, targets: dict[str, Target] | None = None):
        self.targets = dict(targets or {})

    @classmethod
    def load(cls, path: str) -> Targets:
        """{"targets": {"NAME": {"endpoint": ..., "bucket": ..., "prefix": ...}}}"""
        if not path:
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise InvalidSpec(f"backup targets file {path}: {e}") from None
        entries = doc.get("targets") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            raise InvalidSpec(f"backup targets file {path}: expected {{\"targets\": {{...}}}}")
        return cls({name: _target(name, spec) for name, spec in entries.items()})

    def require(self, name: str) -> Target:
        target = self.targets.get(name)
        if target is None:
            known = ", ".join(sorted(self.targets)) or "none configured (--backup-targets)"
            raise InvalidSpec(f"backup target {name!r} is not known (known: {known})")
        return target

    def as_here(self, store: ObjectStore, here: str) -> ObjectStore:
        """A job's target as this process's own file defines it, with the job's
        credentials. In a cluster the controller sends each node its target: the node
        sends data only where its own file agrees (endpoint, bucket and prefix), and its
        own file's local paths (caBundle) are the ones it opens. Precondition when the
        target is unknown here or defined otherwise."""
        theirs = store.target
        mine = self.targets.get(theirs.name)
        if mine is None:
            raise Precondition(f"{here} has no backup target {theirs.name!r}: give it the "
                               "controllers' targets file (--backup-targets)")
        if (mine.endpoint, mine.bucket, mine.prefix) != (theirs.endpoint, theirs.bucket,
                                                         theirs.prefix):
            raise Precondition(
                f"backup target {theirs.name!r} is {_where(mine)} on {here} but "
                f"{_where(theirs)} for the controller: give both the same targets file, "
                "and restart both after changing it")
        return ObjectStore(mine, store.credentials)

    def resolve(self, name: str, secrets: dict[str, str], what: str) -> ObjectStore:
        """The target with credentials from the request's secrets, else its secretsDir."""
        target = self.require(name)
        if secrets:
            return ObjectStore(target, Credentials.from_secrets(secrets, f"the {what} secret"))
        if target.secrets_dir:
            return ObjectStore(target, Credentials.from_secrets(
                _read_secret_dir(target.secrets_dir), f"secretsDir {target.secrets_dir}"))
        raise Precondition(
            f"{what} of a backup on target {name!r} needs its credentials: name the Secret "
            "in the VolumeSnapshotClass (csi.storage.k8s.io/snapshotter-secret-name and "
            "-namespace; provisioner-secret-* in the StorageClass for restores), or give "
            "the target a secretsDir")


def _where(target: Target) -> str:
    return f"{target.endpoint}, bucket {target.bucket}, prefix {target.prefix or '(none)'}"


def _read_secret_dir(path: str) -> dict[str, str]:
    out = {}
    for key in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, ENCRYPTION_KEY, SESSION_TOKEN):
        try:
            with open(os.path.join(path, key), encoding="utf-8") as f:
                out[key] = f.read().strip()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise Precondition(f"secretsDir {path}: cannot read {key}: {e.strerror}") from None
    return out
