"""Backups to object storage, in the control plane: which upload, on which node, how far.

A snapshot taken with a VolumeSnapshotClass's `backupTarget` is a SnapshotRecord with a
BackupState: its local snapshot is taken as for any snapshot (control/snapshots.py), then
its node uploads it in the background (node API start_backup). Each later CreateSnapshot
(the sidecar repeats it until ready_to_use) reads the node's progress into the record, and
restarts an upload a driver restart or an error stopped; once the node reports it done
(the manifest is durable in the bucket) the record says UPLOADED: ready_to_use.

The base of an incremental is the newest uploaded backup of the same volume to the same
target whose local snapshot is still kept; once a newer backup is uploaded, the older
local snapshots are released (record first, storage second). The bucket itself (listing,
deletion, garbage collection) is reached from here directly: it is no node's data.

Credentials: the request's secrets, else the target's secretsDir (targets.py); never
stored in a record, never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from control.node_api import (
    JOB_DONE,
    JOB_FAILED,
    JOB_RUNNING,
    BackupJob,
    JobStatus,
    NodeApi,
    RestoreJob,
)
from control.records import (
    READY,
    SNAPSHOT,
    UPLOADED,
    BackupState,
    SnapshotRecord,
    VolumeRecord,
)
from control.registry import NodeRegistry
from control.store import Conflict, Put, Store
from engine import errors
from engine.backup.manifest import Manifest
from engine.backup.repo import Repository
from engine.backup.targets import BackupRef, ObjectStore, Targets, parse_snapshot_id
from engine.errors import Busy, EngineError, NotFound, Unavailable

log = logging.getLogger(__name__)

REPOSITORIES_KEPT = 16  # open repositories (S3 clients), by target and credentials


def job_error(status: JobStatus) -> EngineError:
    """The domain error a failed job reported (its class kept by name)."""
    cls = getattr(errors, status.error_kind, None)
    if not (isinstance(cls, type) and issubclass(cls, EngineError)):
        cls = EngineError
    return cls(status.error)


def _percent(done: int, total: int) -> str:
    return f"{100 * done // total}%" if total else "starting"


class Backups:
    def __init__(self, store: Store, nodes: NodeRegistry, targets: Targets,
                 intent_timeout_s: float = 600.0, clock: Callable[[], float] = time.time,
                 lock_stale_s: float = 600.0):
        self.store = store
        self.nodes = nodes
        self.targets = targets
        self.intent_timeout_s = intent_timeout_s
        self.clock = clock
        self.lock_stale_s = lock_stale_s
        self._repos: OrderedDict[ObjectStore, Repository] = OrderedDict()
        self._repos_lock = threading.Lock()

    def repository(self, store: ObjectStore) -> Repository:
        """The target's repository, opened once per target and credentials: an S3 client
        costs a few hundred milliseconds to make, and the provisioner retries CreateVolume
        every few seconds while a restore runs."""
        with self._repos_lock:
            repo = self._repos.get(store)
            if repo is not None:
                self._repos.move_to_end(store)
                return repo
        repo = Repository.open(store, lock_stale_s=self.lock_stale_s)
        with self._repos_lock:
            self._repos[store] = repo
            while len(self._repos) > REPOSITORIES_KEPT:
                self._repos.popitem(last=False)
        return repo

    def check_target(self, name: str) -> None:
        self.targets.require(name)

    # --- uploads (CreateSnapshot) ----------------------------------------------------
    def _record(self, snapshot_id: str) -> tuple[SnapshotRecord, int]:
        got = self.store.get(SNAPSHOT + snapshot_id)
        if got is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        return SnapshotRecord.from_value(got.value), got.version

    def _save(self, snap: SnapshotRecord, version: int, backup: BackupState) -> tuple[
            SnapshotRecord, int]:
        new = snap.replace(backup=backup)
        if new == snap:
            return snap, version
        try:
            return new, self.store.commit([Put(new.key, new.to_value(), expect=version)])
        except Conflict:
            raise Busy(f"snapshot {snap.snapshot_id} changed meanwhile; retry") from None

    def advance(self, snapshot_id: str, secrets: dict[str, str]) -> SnapshotRecord:
        """Push a backup's upload on; the record, UPLOADED once the bucket holds it."""
        snap, version = self._record(snapshot_id)
        if snap.backup is None or snap.backup.phase == UPLOADED or snap.state != READY:
            return snap
        if not snap.backup.base_chosen:
            snap, version = self._save(snap, version, self._with_base(snap))
        state = snap.backup
        assert state is not None
        try:
            status, failed = self._push(snap, state, secrets)
        except Unavailable:
            # the node is away: a backup whose manifest the bucket holds is complete
            # without it (the manifest is written last), so it may be ready all the same
            if not self._in_bucket(state, secrets):
                raise
            log.info("backup %s: its node %s is away, and the bucket holds it whole",
                     snapshot_id, snap.node_id)
            status, failed = JobStatus(JOB_DONE, state.bytes_total, state.bytes_total,
                                       state.bytes_uploaded), None
        progress = state.replace(bytes_total=status.bytes_total, bytes_done=status.bytes_done,
                                 bytes_uploaded=status.bytes_uploaded,
                                 last_error=failed.error if failed else state.last_error)
        if status.phase == JOB_DONE:
            snap, version = self._save(snap, version, progress.replace(phase=UPLOADED,
                                                                       last_error=""))
            log.info("backup %s uploaded (%d bytes sent)", snapshot_id, status.bytes_uploaded)
            self._release_older(snap)
            return snap
        snap, version = self._save(snap, version, progress)
        log.info("backup %s uploading: %s of %d bytes", snapshot_id,
                 _percent(status.bytes_done, status.bytes_total), status.bytes_total)
        if failed is not None:
            # restarted above from its checkpoints; the CO hears why it stopped
            raise job_error(failed)
        return snap

    def _push(self, snap: SnapshotRecord, state: BackupState,
              secrets: dict[str, str]) -> tuple[JobStatus, JobStatus | None]:
        """The node's upload: its status, started (or restarted) unless running or done;
        and the status of the failed run restarted, if one was."""
        node = self.nodes.require(snap.node_id)
        status = node.backup_status(snap.snapshot_id)
        failed = status if status is not None and status.phase == JOB_FAILED else None
        if status is None or status.phase not in (JOB_RUNNING, JOB_DONE):
            store = self.targets.resolve(state.target, secrets, "CreateSnapshot")
            status = node.start_backup(BackupJob(snap.snapshot_id, state.backup_id, store,
                                                 state.base_snapshot_id, state.base_backup_id))
        return status, failed

    def _in_bucket(self, state: BackupState, secrets: dict[str, str]) -> bool:
        """Whether the backup's manifest is in its bucket (False when that cannot be
        told: no credentials, the bucket unreachable)."""
        try:
            store = self.targets.resolve(state.target, secrets, "CreateSnapshot")
            return self.repository(store).has_manifest(state.backup_id)
        except EngineError as e:
            log.info("backup %s: its bucket cannot tell whether it is complete: %s",
                     state.backup_id, e)
            return False

    def _backups_of(self, volume_id: str, target: str) -> list[SnapshotRecord]:
        out = []
        for _, got in self.store.list(SNAPSHOT):
            s = SnapshotRecord.from_value(got.value)
            if s.backup is not None and s.source_volume_id == volume_id \
                    and s.backup.target == target and s.state == READY:
                out.append(s)
        return out

    def _with_base(self, snap: SnapshotRecord) -> BackupState:
        """The backup state with its base fixed: the newest uploaded backup of the volume
        to the target whose local snapshot is kept on the same node (or none: full)."""
        assert snap.backup is not None
        bases = [s for s in self._backups_of(snap.source_volume_id, snap.backup.target)
                 if s.backup is not None and s.backup.phase == UPLOADED and s.backup.local
                 and s.node_id == snap.node_id and s.created_at <= snap.created_at
                 and s.snapshot_id != snap.snapshot_id]
        base = max(bases, key=lambda s: s.created_at, default=None)
        if base is None or base.backup is None:
            return snap.backup.replace(base_chosen=True)
        return snap.backup.replace(base_chosen=True, base_snapshot_id=base.snapshot_id,
                                   base_backup_id=base.backup.backup_id)

    def _release_older(self, newest: SnapshotRecord) -> None:
        """Older backups' local snapshots go once a newer one is the base: storage first,
        then the record, so one its node cannot remove now (away) is still marked local
        and released by the next upload. (Marked local but gone is harmless: an upload
        whose base is gone uploads in full.)"""
        assert newest.backup is not None
        backups = self._backups_of(newest.source_volume_id, newest.backup.target)
        # the base of an upload still running stays until that upload is done
        in_use = {s.backup.base_snapshot_id for s in backups
                  if s.backup is not None and s.backup.phase != UPLOADED}
        for old in backups:
            if old.backup is None or not old.backup.local or old.backup.phase != UPLOADED \
                    or old.created_at >= newest.created_at or old.node_id != newest.node_id \
                    or old.snapshot_id in in_use:
                continue
            try:
                self.nodes.require(old.node_id).delete_snapshot(old.snapshot_id)
                current, version = self._record(old.snapshot_id)
                if current.backup is None:
                    continue
                self._save(current, version, current.backup.replace(local=False))
                log.info("released the local snapshot of backup %s (newer base: %s)",
                         old.snapshot_id, newest.snapshot_id)
            except EngineError as e:
                log.info("local snapshot of backup %s kept for now: %s", old.snapshot_id, e)

    # --- the bucket (ListSnapshots, DeleteSnapshot) ----------------------------------
    def manifest(self, ref: BackupRef, secrets: dict[str, str], what: str) -> Manifest:
        """The backup's manifest; NotFound when the bucket has no complete backup of it."""
        repo = self.repository(self.targets.resolve(ref.target, secrets, what))
        return repo.read_manifest(ref.backup_id)

    def delete_data(self, snapshot_id: str, secrets: dict[str, str]) -> None:
        """Remove the backup from its bucket, and the data no other backup references.
        Busy while an upload runs on the target (garbage collection waits for it)."""
        ref = parse_snapshot_id(snapshot_id)
        if ref is None:
            return
        try:
            repo = self.repository(self.targets.resolve(ref.target, secrets, "DeleteSnapshot"))
        except NotFound:
            return  # the target holds no backups at all
        repo.delete_backup(ref.backup_id)
        log.info("deleted backup %s from target %s", ref.backup_id, ref.target)

    # --- restores (CreateVolume from a backup) ---------------------------------------
    def restore(self, record: VolumeRecord, version: int, node: NodeApi,
                secrets: dict[str, str]) -> int:
        """Returns (the record's version) once the node restored and checked the volume;
        Busy with the progress until then. Each call that sees it running extends the
        intent's deadline, so a long restore is not abandoned."""
        ref = parse_snapshot_id(record.source_id)
        if ref is None:
            raise NotFound(f"backup {record.source_id!r} does not exist")
        status = node.restore_status(record.volume_id)
        if status is not None and status.phase == JOB_DONE:
            return version
        failed = status if status is not None and status.phase == JOB_FAILED else None
        if status is None or status.phase != JOB_RUNNING:
            store = self.targets.resolve(ref.target, secrets, "CreateVolume")
            status = node.start_restore(RestoreJob(record.volume_id, ref.backup_id, store))
            if status.phase == JOB_DONE:
                return version
        if failed is not None:
            raise job_error(failed)
        now = self.clock()
        if record.intent_deadline and record.intent_deadline - now < self.intent_timeout_s / 2:
            longer = record.replace(intent_deadline=now + self.intent_timeout_s)
            try:
                version = self.store.commit([Put(longer.key, longer.to_value(),
                                                 expect=version)])
            except Conflict:
                raise Busy(f"volume {record.volume_id} changed meanwhile; retry") from None
        raise Busy(f"restoring volume {record.volume_id} from backup {record.source_id}: "
                   f"{_percent(status.bytes_done, status.bytes_total)} of "
                   f"{status.bytes_total} bytes")
