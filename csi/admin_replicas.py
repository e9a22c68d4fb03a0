"""`tandem-admin replicas [VOLUME_ID ...] --store URL`: each mirrored volume's replicas as
the cluster store records them: the arbiter's state, whether the serving frontend is
connected to it, a resync's or a full rebuild's progress (bytes and percent), whether its
node is registered, and the volume's frontend (node, generation). Read-only: it opens the
cluster store the controllers use (etcd in a cluster) and changes nothing."""

from __future__ import annotations

import argparse
import json
import sys

from control.mirrored import FRONTEND_PREFIX, Mirrors
from control.records import VOLUME, VolumeRecord
from control.registration import NODE
from control.replica_report import condition, replica_reports
from control.store import Store
from control.stores import StoreSpec, open_store
from engine.errors import EngineError

STORE_FLAGS = ("--store", "--store-ca", "--store-cert", "--store-key")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replicas", help="mirrored volumes' replicas: state, resync or "
                                        "rebuild progress, node up")
    p.add_argument("volume_ids", nargs="*", help="default: every mirrored volume")
    for flag in STORE_FLAGS:
        p.add_argument(flag, default="", required=flag == "--store")
    p.add_argument("--store-namespace", default="/tandem/")


def report(store: Store, volume_ids: list[str]) -> list[dict]:
    mirrors = Mirrors(store, nodes=None)  # type: ignore[arg-type]  # reads records only
    if volume_ids:
        found = [store.get(VOLUME + v) for v in volume_ids]
        missing = [v for v, got in zip(volume_ids, found, strict=True) if got is None]
        if missing:
            raise EngineError(f"no such volume: {', '.join(missing)}")
        vols = [VolumeRecord.from_value(got.value) for got in found if got is not None]
    else:
        vols = [VolumeRecord.from_value(got.value) for _, got in store.list(VOLUME)]
    out = []
    for vol in vols:
        if not vol.mirrored:
            continue
        reports = replica_reports(vol, mirrors.replica_states(vol.volume_id),
                                  mirrors.frontend_view(vol.volume_id),
                                  lambda node_id: store.get(NODE + node_id) is not None)
        frontend = store.get(FRONTEND_PREFIX + vol.volume_id)
        overall = condition(reports)
        out.append({
            "volume_id": vol.volume_id, "name": vol.name, "state": vol.state,
            "min_in_sync": vol.min_in_sync,
            "frontend": None if frontend is None else {
                k: frontend.value.get(k) for k in ("node_id", "generation", "state")},
            "condition": overall.message,
            "abnormal": overall.abnormal,
            "replicas": [r.to_dict() for r in reports],
        })
    return out


def run(a: argparse.Namespace) -> int:
    try:
        store = open_store(StoreSpec(a.store, a.store_ca, a.store_cert, a.store_key,
                                     namespace=a.store_namespace))
    except EngineError as e:
        print(f"cannot open the cluster store: {e}", file=sys.stderr)
        return 2
    try:
        rows = report(store, a.volume_ids)
    except EngineError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        store.close()
    json.dump(rows, sys.stdout, indent=2)
    print()
    return 0
