"""`tandem-admin backup ...`: backup jobs on this node, and checks of what a bucket holds.

    tandem-admin [--state-dir DIR] backup status
        this node's upload and restore jobs: phase, bytes done of total, bytes uploaded,
        the error of a failed one (read from the node's store, beside a running driver)
    tandem-admin backup list --targets-file F TARGET
    tandem-admin backup verify --targets-file F SNAPSHOT_ID
        read the backup back and check every blob (exit 1 and the damaged blob named)
    tandem-admin backup gc --targets-file F TARGET
        delete the packs no backup references (left by cancelled uploads); refused while
        an upload runs on the target

Credentials for the bucket: --secrets-dir (a mounted Secret: files accessKeyId,
secretAccessKey, encryptionKey), else the environment variable TANDEM_BACKUP_SECRETS
holding the same keys as a JSON object. Never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from engine.backup import restore
from engine.backup.jobs import BACKUP_JOB, RESTORE_JOB
from engine.backup.repo import Repository
from engine.backup.targets import Targets, parse_snapshot_id
from engine.errors import EngineError, InvalidSpec
from engine.state import SqliteStore

SECRETS_ENV = "TANDEM_BACKUP_SECRETS"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="backup jobs, and checks of a target's backups")
    cmds = p.add_subparsers(dest="backup_command", required=True)
    cmds.add_parser("status", help="this node's upload and restore jobs")
    for name in ("list", "verify", "gc"):
        c = cmds.add_parser(name)
        c.add_argument("--targets-file", required=True)
        c.add_argument("--secrets-dir", default="")
        c.add_argument("what", help="a target (list, gc) or a backup's snapshot ID (verify)")


def status(state_dir: str) -> dict:
    store = SqliteStore(os.path.join(state_dir, "state.sqlite"))
    try:
        return {kind: [{"id": key, **rec} for key, rec in store.list(kind)]
                for kind in (BACKUP_JOB, RESTORE_JOB)}
    finally:
        store.close()


def _repository(a: argparse.Namespace, target_name: str) -> Repository:
    targets = Targets.load(a.targets_file)
    target = targets.require(target_name)
    secrets: dict[str, str] = {}
    if a.secrets_dir:
        targets.targets[target_name] = dataclasses.replace(target, secrets_dir=a.secrets_dir)
    elif os.environ.get(SECRETS_ENV):
        try:
            secrets = json.loads(os.environ[SECRETS_ENV])
        except ValueError:
            raise InvalidSpec(f"{SECRETS_ENV} is not a JSON object") from None
    return Repository.open(targets.resolve(target_name, secrets, "tandem-admin backup"))


def run(a: argparse.Namespace) -> int:
    try:
        if a.backup_command == "status":
            report: object = status(a.state_dir)
        elif a.backup_command == "list":
            repo = _repository(a, a.what)
            listing: list[dict] = []
            report = listing
            for backup_id in repo.backup_ids():
                m = repo.read_manifest(backup_id)
                listing.append({"snapshot_id": f"bkp:{a.what}:{backup_id}",
                               "volume_id": m.volume_id, "size_bytes": m.size_bytes,
                               "created_at": m.created_at, "data_bytes": m.data_bytes,
                               "base_backup_id": m.base_backup_id})
        elif a.backup_command == "gc":
            packs, freed = _repository(a, a.what).collect_garbage()
            report = {"target": a.what, "packs_deleted": packs, "bytes_freed": freed}
        else:
            ref = parse_snapshot_id(a.what)
            if ref is None:
                raise InvalidSpec(f"{a.what!r} is not a backup's snapshot ID (bkp:TARGET:ID)")
            report = restore.verify(_repository(a, ref.target), ref.backup_id)
    except EngineError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
