"""`tandem-admin`: what an operator asks a node, read from its state and the kernel.

    tandem-admin [--state-dir DIR] volumes       volumes, tiers, where they are published
    tandem-admin [--state-dir DIR] io [--interval-s 1]
                                                 per-volume IOPS and bytes/s of each pod
    tandem-admin [--state-dir DIR] orphans       storage no record owns (kept, reported)
    tandem-admin [--state-dir DIR] purge NAME    remove one orphan (the driver stopped)
    tandem-admin [--state-dir DIR] backup status|list|verify
                                                 backup jobs; a target's backups, checked
                                                 (csi/admin_backup.py)

It reads the driver's state store (SQLite in WAL mode: safe beside a running driver) and the
pods' cgroup statistics; NodeGetVolumeStats has no field for I/O rates, so this is where
they are seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from csi import admin_backup
from csi.config import Config
from engine.errors import EngineError
from engine.node_records import Device, NodeRecords, format_device
from engine.qos import stats
from engine.qos.cgroups import CgroupLayout, detect, find_pod_cgroup
from engine.qos.tiers import QosSpec
from engine.state import SqliteStore
from engine.volumes import KIND as BACKING
from engine.volumes import Backing


@dataclass(frozen=True)
class Sampled:
    volume_id: str
    pod_uid: str
    device: Device
    cgroup_dir: str  # "" when the I/O is read from the device (no pod known)


def volumes_report(store: SqliteStore) -> list[dict]:
    published: dict[str, list[dict]] = {}
    for pub in NodeRecords(store).list_publishes():
        published.setdefault(pub.volume_id, []).append(
            {"target": pub.target, "pod_uid": pub.pod_uid,
             "device": format_device(pub.device), "read_only": pub.read_only})
    out = []
    for volume_id, rec in store.list(BACKING):  # this node's volumes, as it enforces them
        backing = Backing.from_record(volume_id, rec)
        spec = QosSpec.from_json(backing.qos_json)
        out.append({
            "volume_id": volume_id, "capacity_bytes": backing.size_bytes,
            "tier": spec.name or "(none)",
            "max_read_iops": spec.max_read_iops, "max_write_iops": spec.max_write_iops,
            "min_iops": spec.min_iops, "published": published.get(volume_id, []),
        })
    return out


def _sources(store: SqliteStore, layout: CgroupLayout | None) -> list[Sampled]:
    found = []
    for pub in NodeRecords(store).list_publishes():
        if pub.device is None:
            continue
        cgroup_dir = ""
        if pub.pod_uid and layout is not None:
            try:
                cgroup_dir = find_pod_cgroup(layout, pub.pod_uid)
            except EngineError:
                pass
        found.append(Sampled(pub.volume_id, pub.pod_uid, pub.device, cgroup_dir))
    return found


def _counters(layout: CgroupLayout | None, src: Sampled) -> tuple[int, int, int, int]:
    if src.cgroup_dir and layout is not None:
        c = stats.read_cgroup(layout.version, src.cgroup_dir, src.device)
        return c.read_ios, c.write_ios, c.read_bytes, c.write_bytes
    d = stats.read_device(src.device)
    return (d.read_ios, d.write_ios, -1, -1) if d else (0, 0, -1, -1)


def io_report(store: SqliteStore, cgroup_root: str, cgroup_parent: str,
              interval_s: float) -> list[dict]:
    try:
        layout: CgroupLayout | None = detect(cgroup_root, cgroup_parent)
    except EngineError:
        layout = None
    sources = _sources(store, layout)
    before = [_counters(layout, s) for s in sources]
    time.sleep(interval_s)
    after = [_counters(layout, s) for s in sources]
    rows = []
    for src, a, b in zip(sources, before, after, strict=True):
        per_s = [max(0, y - x) / interval_s for x, y in zip(a, b, strict=True)]
        rows.append({
            "volume_id": src.volume_id, "pod_uid": src.pod_uid,
            "device": f"{src.device[0]}:{src.device[1]}",
            "source": "pod cgroup" if src.cgroup_dir else "device",
            "read_iops": round(per_s[0], 1), "write_iops": round(per_s[1], 1),
            "read_bytes_per_s": round(per_s[2]) if a[2] >= 0 else None,
            "write_bytes_per_s": round(per_s[3]) if a[3] >= 0 else None,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tandem-admin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", default="/var/lib/tandem")
    p.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    p.add_argument("--cgroup-parent", default="")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("volumes")
    io = sub.add_parser("io")
    io.add_argument("--interval-s", type=float, default=1.0)
    sub.add_parser("orphans", help="storage no record owns (kept until purged)")
    purge = sub.add_parser("purge", help="remove one orphan (the driver must be stopped)")
    purge.add_argument("name", help="a pool object name (32 hex) or a vol-/snap- ID")
    for flag in ("--store", "--store-ca", "--store-cert", "--store-key"):
        purge.add_argument(flag, default="")
    purge.add_argument("--store-namespace", default="/tandem/")
    purge.add_argument("--pool", default="", help="pool directory (default STATE_DIR/pool)")
    admin_backup.add_parser(sub)
    a = p.parse_args(argv)
    if a.command == "backup":
        return admin_backup.run(a)
    if a.command in ("orphans", "purge"):
        return _orphans_command(p, a)
    store = SqliteStore(f"{a.state_dir}/state.sqlite")
    try:
        if a.command == "volumes":
            report = volumes_report(store)
        else:
            report = io_report(store, a.cgroup_root, a.cgroup_parent, a.interval_s)
    finally:
        store.close()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def _orphans_command(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    from csi import admin_orphans  # imports the driver's wiring: only when asked
    if a.command == "purge" and not admin_orphans.is_purgeable_name(a.name):
        p.error(f"{a.name!r} is neither a pool object name nor a vol-/snap- ID")
    config = Config(endpoint="unix:///dev/null", node_id="admin",
                    state_dir=os.path.abspath(a.state_dir),
                    pool_dir=os.path.abspath(a.pool) if getattr(a, "pool", "") else "",
                    store_url=getattr(a, "store", ""), store_ca_file=getattr(a, "store_ca", ""),
                    store_cert_file=getattr(a, "store_cert", ""),
                    store_key_file=getattr(a, "store_key", ""),
                    store_namespace=getattr(a, "store_namespace", "/tandem/"))
    if a.command == "orphans":
        return admin_orphans.orphans(config)
    return admin_orphans.purge(config, a.name)


if __name__ == "__main__":
    sys.exit(main())
