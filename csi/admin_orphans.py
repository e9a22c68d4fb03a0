"""`tandem-admin orphans | purge NAME`: storage no record owns, listed and (explicitly) removed.

The driver never deletes storage because a record is missing (docs/architecture.md); it
reports such storage at every reconcile round in STATE_DIR/orphans.json:
  volumes, snapshots            this node's, with a node record but no cluster record
  pool_volumes, pool_snapshots  pool objects not even this node's records name
`purge` removes one of them. It refuses while the driver runs (the state lock), refuses
anything a record still owns, and for a volume with no cluster record checks the cluster
store itself rather than trusting the report.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from control.records import SNAPSHOT, VOLUME
from control.stores import StoreSpec, open_store
from csi.config import Config
from csi.server import StartupError, take_state_lock
from engine.errors import EngineError, InUse, NotFound
from engine.loopdev import LoopDevices
from engine.mounts import Mounts
from engine.node_records import NodeRecords
from engine.pool import Pool
from engine.snapshots import KIND as SNAPSHOT_BACKING
from engine.state import SqliteStore
from engine.volumes import VolumeFiles

POOL_NAME = re.compile(r"^[0-9a-f]{32}$")
OBJECT_ID = re.compile(r"^(vol|snap)-[0-9a-f]{32}$")


def is_purgeable_name(name: str) -> bool:
    return bool(POOL_NAME.match(name) or OBJECT_ID.match(name))


def orphans(config: Config) -> int:
    try:
        with open(config.orphans_path) as f:
            report = json.load(f)
    except FileNotFoundError:
        print("no report yet: the driver writes one at start-up and at every reconcile round",
              file=sys.stderr)
        return 1
    report["age_s"] = round(time.time() - report.get("at", 0), 1)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def purge(config: Config, name: str) -> int:
    try:
        lock = take_state_lock(config)
    except StartupError as e:
        print(f"purge refused: {e}; stop it first (purging beside a running driver could "
              "race its own work)", file=sys.stderr)
        return 2
    store = SqliteStore(config.store_path)
    try:
        pool = _open_pool(config)
        files = VolumeFiles(store, pool)
        if POOL_NAME.match(name):
            _purge_pool_object(store, pool, files, name)
        else:
            _purge_unrecorded(config, store, files, name)
    except EngineError as e:
        print(f"purge refused: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
        os.close(lock)
    print(f"purged {name}")
    return 0


def _open_pool(config: Config) -> Pool:
    directory, image = config.pool_directory, config.pool_image_path
    if not os.path.isdir(directory) or not (os.path.exists(image) or os.listdir(directory)):
        raise NotFound(f"no pool at {directory}")
    pool = Pool(directory, image, config.pool_image_bytes, image_fs=config.pool_image_fs,
                loops=LoopDevices(), mounts=Mounts())
    pool.open()  # adopts the pool as the driver left it (mounts its image if need be)
    return pool


def _purge_pool_object(store: SqliteStore, pool: Pool, files: VolumeFiles, name: str) -> None:
    if name in pool.volumes():
        files.purge_orphan(name)
        return
    if name in pool.snapshots():
        if any(rec["pool_name"] == name for _, rec in store.list(SNAPSHOT_BACKING)):
            raise InUse(f"pool snapshot {name} belongs to a snapshot; it is not an orphan")
        pool.delete_snapshot(name)
        return
    raise NotFound(f"no pool object {name}")


def _purge_unrecorded(config: Config, store: SqliteStore, files: VolumeFiles, name: str) -> None:
    """A volume or snapshot this node holds whose cluster record is gone."""
    cluster = open_store(StoreSpec(config.cluster_store_url, config.store_ca_file,
                                   config.store_cert_file, config.store_key_file,
                                   config.store_timeout_s, config.store_namespace))
    try:
        key = (VOLUME if name.startswith("vol-") else SNAPSHOT) + name
        if cluster.get(key) is not None:
            raise InUse(f"{name} has a cluster record: delete it through the CO, not here")
    finally:
        cluster.close()
    if name.startswith("vol-"):
        if files.get(name) is None:
            raise NotFound(f"this node holds no volume {name}")
        if NodeRecords(store).get_stage(name) is not None:
            raise InUse(f"volume {name} is staged on this node; unstage it first")
        files.delete(name)
        return
    snap = store.get(SNAPSHOT_BACKING, name)
    if snap is None:
        raise NotFound(f"this node holds no snapshot {name}")
    files.pool.delete_snapshot(snap["pool_name"])
    store.delete(SNAPSHOT_BACKING, name)
