"""`tandem-admin`: what an operator asks a node, read from its state and the kernel.

    tandem-admin [--state-dir DIR] volumes       volumes, tiers, where they are published
    tandem-admin [--state-dir DIR] io [--interval-s 1]
                                                 per-volume IOPS and bytes/s of each pod
    tandem-admin [--state-dir DIR] orphans       storage no record owns (kept, reported)
    tandem-admin [--state-dir DIR] purge NAME    remove one orphan (the driver stopped)
    tandem-admin [--state-dir DIR] capacity [show]
                                                 the pool's IOPS capacity for guaranteed
                                                 minima: figure, source, method, date
    tandem-admin [--state-dir DIR] capacity measure [--pool DIR] [--seconds 30]
                                                 measure it again (about 45 s) and keep it
    tandem-admin [--state-dir DIR] capacity set IOPS
                                                 set it by hand and keep it
    tandem-admin [--state-dir DIR] backup status|list|verify
                                                 backup jobs; a target's backups, checked
                                                 (csi/admin_backup.py)

It reads the driver's state store and the pods' cgroup statistics; NodeGetVolumeStats has no
field for I/O rates, so this is where they are seen. The store is SQLite in WAL mode: reading
and writing it beside a running driver is safe (SQLite's own locks order the writes), so
this tool never takes the driver's state lock (`tandem.lock`, held by the driver for its
whole life). The driver reads the capacity from the store at each admission decision: a
figure measured or set here takes effect at once, without a restart (a driver started with
--node-iops-capacity puts its flag's figure back at its next start).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

from csi import admin_backup, admin_replicas
from csi.config import Config
from engine.errors import EngineError
from engine.node_records import Device, NodeRecords, format_device
from engine.qos import capacity, stats
from engine.qos.capacity import Capacity
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


def capacity_report(cap: Capacity | None) -> dict:
    if cap is None:
        return {"iops": None, "source": "", "method": "never measured: the driver measures "
                "the pool at its first start", "date": ""}
    report: dict = {"iops": cap.iops, "source": cap.source, "method": cap.method,
                    "date": cap.date}
    if cap.samples:
        report["per_second_iops"] = {"count": len(cap.samples), "min": min(cap.samples),
                                     "median": round(statistics.median(cap.samples)),
                                     "max": max(cap.samples)}
    return report


def pool_problem(layout: Config) -> str:
    """Why the pool cannot be measured now ('' when it can): it must be the driver's pool,
    set up and mounted (after a reboot, the driver mounts its image at its start)."""
    pool_dir = layout.pool_directory
    if not os.path.isdir(os.path.join(pool_dir, "volumes")):
        return f"{pool_dir} is not a tandem pool (no volumes/ in it): give --pool"
    if os.path.exists(layout.pool_image_path) and not os.path.ismount(pool_dir):
        return f"the pool image is not mounted at {pool_dir}: start the driver first"
    return ""


def measure_capacity(store: SqliteStore, layout: Config, seconds: int) -> Capacity:
    problem = pool_problem(layout)
    if problem:
        raise SystemExit(f"tandem-admin: {problem}")
    staged = len(NodeRecords(store).list_stages())
    if staged:
        print(f"tandem-admin: {staged} volume(s) are staged on this node; their I/O competes "
              "with the measurement, which may come out low (it runs on a scratch file, never "
              "on a volume)", file=sys.stderr)
    cap = capacity.measure(layout.pool_directory, seconds=seconds)
    capacity.save(store, cap)
    return cap


def set_capacity(store: SqliteStore, iops: int) -> Capacity:
    cap = Capacity(iops, capacity.OPERATOR, "set by an operator", time.time())
    capacity.save(store, cap)
    return cap


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
    cap = sub.add_parser("capacity", help="the pool's IOPS capacity for guaranteed minima")
    cap_sub = cap.add_subparsers(dest="action")
    cap_sub.add_parser("show")
    measure = cap_sub.add_parser("measure", help="measure again (the node should be quiet)")
    measure.add_argument("--pool", default="", help="pool directory (default: STATE_DIR/pool)")
    measure.add_argument("--seconds", type=int, default=capacity.RUN_S)
    set_ = cap_sub.add_parser("set", help="set the figure by hand")
    set_.add_argument("iops", type=int)
    admin_backup.add_parser(sub)
    admin_replicas.add_parser(sub)
    a = p.parse_args(argv)
    if a.command == "backup":
        return admin_backup.run(a)
    if a.command == "replicas":
        return admin_replicas.run(a)
    if a.command in ("orphans", "purge"):
        return _orphans_command(p, a)
    # where the driver keeps things, from the same definitions it uses
    layout = Config(endpoint="", node_id="", state_dir=os.path.abspath(a.state_dir),
                    pool_dir=os.path.abspath(a.pool) if getattr(a, "pool", "") else "")
    path = layout.store_path
    if not os.path.isfile(path):  # never make an empty store where the driver's is not
        p.error(f"no driver state at {path}: give --state-dir")
    if a.command == "capacity" and a.action == "set" and a.iops <= 0:
        p.error("the capacity must be a positive number of IOPS")
    if a.command == "capacity" and a.action == "measure" \
            and a.seconds < capacity.MIN_SAMPLES + 1:
        p.error(f"--seconds must be at least {capacity.MIN_SAMPLES + 1}")
    store = SqliteStore(path)
    report: object
    try:
        if a.command == "volumes":
            report = volumes_report(store)
        elif a.command == "io":
            report = io_report(store, a.cgroup_root, a.cgroup_parent, a.interval_s)
        elif a.action == "measure":
            report = capacity_report(measure_capacity(store, layout, a.seconds))
        elif a.action == "set":
            report = capacity_report(set_capacity(store, a.iops))
        else:
            report = capacity_report(capacity.load(store))
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
