"""Backup and restore jobs on the node that holds the data, in the background.

A job is started (idempotently) through the node API and runs in a thread of its own; its
state lives in the node's own store (engine/state.py), never the credentials:
  backup-job/<snapshot ID>          what to upload, phase, progress, the error if it failed
  backup-checkpoint/<ID>/<seq>      each durable pack's blobs and extents (upload.py)
  restore-job/<volume ID>           what to restore, phase, progress, error
After a restart a job whose record says "running" has no thread: it reports "stopped",
and the controller's next call (which brings the credentials again: the sidecars retry
CreateSnapshot and CreateVolume until they are done) resumes it from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine import errors
from engine.backup import restore, upload
from engine.backup.manifest import Manifest
from engine.backup.repo import Repository
from engine.backup.targets import ObjectStore, Target
from engine.errors import Busy, EngineError, NotFound
from engine.state import Store

log = logging.getLogger(__name__)

BACKUP_JOB, CHECKPOINT, RESTORE_JOB = "backup-job", "backup-checkpoint", "restore-job"
RUNNING, DONE, FAILED, STOPPED = "running", "done", "failed", "stopped"
SAVE_PROGRESS_S = 2.0
GC_WAIT_S = 300.0  # how long an upload waits for a garbage collection to finish


@dataclass(frozen=True)
class JobState:
    phase: str
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_uploaded: int = 0
    error: str = ""
    error_kind: str = ""  # the domain error's class name (engine/errors.py)


@dataclass(frozen=True)
class BackupSpec:
    snapshot_id: str
    backup_id: str
    volume_id: str
    created_at: float
    base_snapshot_id: str = ""
    base_backup_id: str = ""


@dataclass(frozen=True)
class RestoreSpec:
    volume_id: str
    backup_id: str


def _target_value(target: Target) -> dict:
    return dataclasses.asdict(target)


class _Running:
    def __init__(self, thread: threading.Thread, progress: upload.Progress):
        self.thread = thread
        self.progress = progress
        self.cancel = threading.Event()


class Jobs:
    """The node's backup and restore jobs. snapshot_path / volume_path give a local
    snapshot's or volume's file (NotFound when it has none)."""

    def __init__(self, store: Store, snapshot_path: Callable[[str], str],
                 volume_path: Callable[[str], str], lock_stale_s: float = 600.0):
        self.store = store
        self.snapshot_path = snapshot_path
        self.volume_path = volume_path
        self.lock_stale_s = lock_stale_s
        self._lock = threading.RLock()  # _state() is asked inside start_*()
        self._running: dict[tuple[str, str], _Running] = {}

    # --- status ----------------------------------------------------------------------
    def _state(self, kind: str, key: str) -> JobState | None:
        rec = self.store.get(kind, key)
        if rec is None:
            return None
        with self._lock:
            running = self._running.get((kind, key))
        if running is not None and running.thread.is_alive():
            p = running.progress
            return JobState(RUNNING, p.bytes_total, p.bytes_done, p.bytes_uploaded)
        phase = STOPPED if rec["phase"] == RUNNING else rec["phase"]
        return JobState(phase, rec.get("bytes_total", 0), rec.get("bytes_done", 0),
                        rec.get("bytes_uploaded", 0), rec.get("error", ""),
                        rec.get("error_kind", ""))

    def backup_state(self, snapshot_id: str) -> JobState | None:
        return self._state(BACKUP_JOB, snapshot_id)

    def restore_state(self, volume_id: str) -> JobState | None:
        return self._state(RESTORE_JOB, volume_id)

    def _save(self, kind: str, key: str, **changes: object) -> None:
        with self.store.txn() as t:
            rec = t.get(kind, key)
            if rec is not None:
                t.put(kind, key, {**rec, **changes, "updated_at": time.time()})

    # --- starting --------------------------------------------------------------------
    def start_backup(self, spec: BackupSpec, store: ObjectStore) -> JobState:
        key = (BACKUP_JOB, spec.snapshot_id)
        with self._lock:
            state = self._state(*key)
            if state is not None and state.phase in (RUNNING, DONE):
                return state
            rec = self.store.get(*key)
            if rec is not None and rec["backup_id"] != spec.backup_id:
                raise errors.AlreadyExists(f"snapshot {spec.snapshot_id} is being backed "
                                           f"up as {rec['backup_id']}")
            self.snapshot_path(spec.snapshot_id)  # NotFound: nothing to upload here
            value = {**dataclasses.asdict(spec), "target": _target_value(store.target),
                     "phase": RUNNING, "error": "", "error_kind": "",
                     "started_at": rec.get("started_at", time.time()) if rec else time.time()}
            self.store.put(BACKUP_JOB, spec.snapshot_id, {**(rec or {}), **value})
            self._spawn(key, lambda r: self._run_backup(spec, store, r))
            return JobState(RUNNING)

    def start_restore(self, spec: RestoreSpec, store: ObjectStore) -> JobState:
        key = (RESTORE_JOB, spec.volume_id)
        with self._lock:
            state = self._state(*key)
            if state is not None and state.phase in (RUNNING, DONE):
                return state
            rec = self.store.get(*key)
            if rec is not None and rec["backup_id"] != spec.backup_id:
                raise errors.AlreadyExists(f"volume {spec.volume_id} is being restored from "
                                           f"{rec['backup_id']}")
            self.volume_path(spec.volume_id)
            self.store.put(RESTORE_JOB, spec.volume_id, {
                **dataclasses.asdict(spec), "target": _target_value(store.target),
                "phase": RUNNING, "error": "", "error_kind": "", "started_at": time.time()})
            self._spawn(key, lambda r: self._run_restore(spec, store, r))
            return JobState(RUNNING)

    def _spawn(self, key: tuple[str, str], body: Callable[[_Running], None]) -> None:
        progress = upload.Progress()
        thread = threading.Thread(target=lambda: self._guard(key, body, running), daemon=True,
                                  name=f"{key[0]}-{key[1][-8:]}")
        running = _Running(thread, progress)
        self._running[key] = running
        thread.start()

    def _guard(self, key: tuple[str, str], body: Callable[[_Running], None],
               running: _Running) -> None:
        kind, name = key
        try:
            body(running)
        except upload.Canceled:
            log.info("%s %s stopped", kind, name)
        except EngineError as e:
            log.warning("%s %s failed: %s", kind, name, e)
            self._finish(running, kind, name, FAILED, str(e), type(e).__name__)
        except Exception as e:  # noqa: BLE001 - kept in the job's record for the caller
            log.exception("%s %s failed unexpectedly", kind, name)
            self._finish(running, kind, name, FAILED, f"{type(e).__name__}: {e}",
                         "EngineError")

    def _finish(self, running: _Running, kind: str, name: str, phase: str, error: str = "",
                error_kind: str = "") -> None:
        p = running.progress
        self._save(kind, name, phase=phase, error=error, error_kind=error_kind,
                   bytes_total=p.bytes_total, bytes_done=p.bytes_done,
                   bytes_uploaded=p.bytes_uploaded)

    # --- the work --------------------------------------------------------------------
    def _checkpoints(self, snapshot_id: str) -> tuple[list[upload.Checkpoint], int]:
        """The upload's checkpoints, and the number the next one takes."""
        found = self.store.list(CHECKPOINT, prefix=snapshot_id + "/")
        next_seq = int(found[-1][0].rsplit("/", 1)[1]) + 1 if found else 0
        return [upload.Checkpoint.from_value(v) for _, v in found], next_seq

    def _run_backup(self, spec: BackupSpec, store: ObjectStore, running: _Running) -> None:
        started = time.monotonic()
        repo = Repository.open(store, create=True, lock_stale_s=self.lock_stale_s)
        path = self.snapshot_path(spec.snapshot_id)
        base, base_path = self._base(repo, spec)
        the_plan = upload.plan(path, os.stat(path).st_size, base_path, base)
        planned = time.monotonic()
        checkpoints, next_seq = self._checkpoints(spec.snapshot_id)
        seq = [next_seq]
        last_save = [time.monotonic()]

        def save(cp: upload.Checkpoint) -> None:
            with self._lock:
                n = seq[0]
                seq[0] += 1
            self.store.put(CHECKPOINT, f"{spec.snapshot_id}/{n:08d}", cp.to_value())
            if time.monotonic() - last_save[0] > SAVE_PROGRESS_S:
                last_save[0] = time.monotonic()
                p = running.progress
                self._save(BACKUP_JOB, spec.snapshot_id, bytes_total=p.bytes_total,
                           bytes_done=p.bytes_done, bytes_uploaded=p.bytes_uploaded)

        uploader = upload.Uploader(repo, path, the_plan, backup_id=spec.backup_id,
                                   volume_id=spec.volume_id, created_at=spec.created_at,
                                   checkpoints=checkpoints, save=save,
                                   progress=running.progress, cancel=running.cancel)
        deadline = time.monotonic() + GC_WAIT_S
        while True:
            try:
                manifest = uploader.run()
                break
            except Busy:
                if time.monotonic() > deadline or running.cancel.wait(1.0):
                    raise
        self._finish(running, BACKUP_JOB, spec.snapshot_id, DONE)
        self._drop_checkpoints(spec.snapshot_id)
        log.info("backup %s of %s done: %d data bytes, %d uploaded (base %s); planned in "
                 "%.2f s, uploaded in %.2f s", spec.backup_id, spec.volume_id,
                 manifest.data_bytes, running.progress.bytes_uploaded,
                 the_plan.base_backup_id or "none", planned - started,
                 time.monotonic() - planned)

    def _base(self, repo: Repository, spec: BackupSpec) -> tuple[Manifest | None, str]:
        """The base's manifest and local snapshot, or (None, "") for a full upload."""
        if not spec.base_snapshot_id or not spec.base_backup_id:
            return None, ""
        try:
            base_path = self.snapshot_path(spec.base_snapshot_id)
            return repo.read_manifest(spec.base_backup_id), base_path
        except NotFound:
            log.info("backup %s: base %s gone; uploading in full", spec.backup_id,
                     spec.base_backup_id)
            return None, ""

    def _run_restore(self, spec: RestoreSpec, store: ObjectStore, running: _Running) -> None:
        repo = Repository.open(store, lock_stale_s=self.lock_stale_s)
        manifest = repo.read_manifest(spec.backup_id)
        restore.restore_into(repo, manifest, self.volume_path(spec.volume_id),
                             running.progress, running.cancel)
        self._finish(running, RESTORE_JOB, spec.volume_id, DONE)
        log.info("volume %s restored from backup %s (%d bytes of data, every blob checked)",
                 spec.volume_id, spec.backup_id, running.progress.bytes_done)

    # --- stopping --------------------------------------------------------------------
    def _stop(self, kind: str, key: str, timeout_s: float = 60.0) -> None:
        with self._lock:
            running = self._running.pop((kind, key), None)
        if running is not None:
            running.cancel.set()
            running.thread.join(timeout_s)
            if running.thread.is_alive():
                raise Busy(f"{kind} {key} is still stopping; retry")

    def _drop_checkpoints(self, snapshot_id: str) -> None:
        for k, _ in self.store.list(CHECKPOINT, prefix=snapshot_id + "/"):
            self.store.delete(CHECKPOINT, k)

    def forget_backup(self, snapshot_id: str) -> None:
        """Stop the upload (its lock released) and drop its records: the snapshot goes."""
        self._stop(BACKUP_JOB, snapshot_id)
        self._drop_checkpoints(snapshot_id)
        self.store.delete(BACKUP_JOB, snapshot_id)

    def forget_restore(self, volume_id: str) -> None:
        self._stop(RESTORE_JOB, volume_id)
        self.store.delete(RESTORE_JOB, volume_id)

    def close(self) -> None:
        """Stop every job (the driver stops); their records say running: resumed later."""
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for r in running:
            r.cancel.set()
        for r in running:
            r.thread.join(30)
