"""The controller's control plane, assembled: store, registry, index, managers, reconciler.

Used by the all-in-one driver (one in-process node) and, in a cluster, by each
controller (nodes reached through agents). Start-up order matters: the index is loaded
from the store before any call is served, and the reconciler's first round runs before
serving so half-done work from before a crash is settled first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from control.backups import Backups
from control.healing import Healer
from control.reconcile import Orphans, Reconciler
from control.records import VOLUME
from control.registry import NodeRegistry
from control.snapshots import Snapshots
from control.store import Compacted, Store, Watch
from control.tombstones import TombstoneSweeper
from control.volume_index import VolumeIndex
from control.volumes import VolumePolicy, Volumes
from engine.backup.targets import Targets
from engine.errors import Unavailable
from engine.locks import KeyLocks

log = logging.getLogger(__name__)


class ControlPlane:
    def __init__(self, store: Store, nodes: NodeRegistry, policy: VolumePolicy,
                 clock: Callable[[], float] = time.time,
                 report: Callable[[Orphans], None] | None = None,
                 targets: Targets | None = None, backup_lock_stale_s: float = 600.0):
        self.store = store
        self.nodes = nodes
        self.index = VolumeIndex()
        self.locks = KeyLocks()  # this controller's names and IDs (the nodes have their own)
        self.volumes = Volumes(store, nodes, self.index, policy, self.locks, clock=clock)
        self.snapshots = Snapshots(store, nodes, self.volumes, self.locks,
                                   intent_timeout_s=policy.intent_timeout_s, clock=clock)
        self.volumes.snapshot_source = self.snapshots.source_of
        self.volumes.snapshot_copy_nodes = self.snapshots.copies_of
        self.backups = Backups(store, nodes, targets or Targets(), policy.intent_timeout_s,
                               clock, lock_stale_s=backup_lock_stale_s)
        self.snapshots.backups = self.volumes.backups = self.backups
        self.volumes.sweeper = TombstoneSweeper(store, self._tombstone_removed)
        self.reconciler = Reconciler(store, nodes, self.volumes, self.snapshots, clock, report)
        self.reconciler.healer = Healer(store, nodes, self.volumes,
                                        policy.replica_replace_after_s, clock)
        self._watch: Watch | None = None
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()

    def _tombstone_removed(self, key: str, revision: int) -> None:
        self.index.note_value(key, None, revision)

    def start(self, reconcile_interval_s: float, *, shared_store: bool = True,
              reconcile: bool = True) -> None:
        """shared_store: other controllers write to the store too (etcd), so the index
        follows it; an embedded store only ever sees this controller's own commits.
        reconcile=False: this controller serves calls but leaves the background work to
        the leader (control/leader.py, with reconciler_on())."""
        revision = self._load_index()
        if reconcile:
            self.reconciler.run_once()
        if shared_store:
            self._follow(revision)
        if reconcile and reconcile_interval_s > 0:
            self.reconciler.start(reconcile_interval_s)

    def reconciler_on(self, store: Store) -> Reconciler:
        """A reconciler whose commits all go to `store` (a leader's fenced store), sharing
        this plane's nodes, index and locks with the calls it serves."""
        policy = self.volumes.policy
        volumes = Volumes(store, self.nodes, self.index, policy, self.locks,
                          clock=self.volumes.clock)
        snapshots = Snapshots(store, self.nodes, volumes, self.locks,
                              intent_timeout_s=policy.intent_timeout_s,
                              clock=self.volumes.clock)
        volumes.snapshot_source = snapshots.source_of
        volumes.snapshot_copy_nodes = snapshots.copies_of
        reconciler = Reconciler(store, self.nodes, volumes, snapshots, self.volumes.clock,
                                self.reconciler.report)
        reconciler.healer = Healer(store, self.nodes, volumes, policy.replica_replace_after_s,
                                   self.volumes.clock)
        return reconciler

    def _load_index(self) -> int:
        listing = self.store.list_with_revision(VOLUME)
        for key, got in listing.items:
            self.index.note_value(key, got.value, got.version)
        return listing.revision

    def _follow(self, revision: int) -> None:
        """Keep the index current with other controllers' commits."""
        def loop(start: int) -> None:
            while not self._closed.is_set():
                try:
                    self._watch = self.store.watch(VOLUME, start_revision=start + 1)
                    for event in self._watch:
                        value = event.value.value if event.value else None
                        self.index.note_value(event.key, value, event.revision)
                        start = event.revision
                except Compacted:
                    start = self._load_index()
                except Unavailable as e:
                    if self._closed.wait(1.0):
                        return
                    log.info("volume watch interrupted (%s); resuming", e)

        self._watcher = threading.Thread(target=loop, args=(revision,), daemon=True,
                                         name="volume-index")
        self._watcher.start()

    def close(self) -> None:
        self._closed.set()
        self.reconciler.stop()
        if self.volumes.sweeper is not None:
            self.volumes.sweeper.close()
        if self._watch is not None:
            self._watch.cancel()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
