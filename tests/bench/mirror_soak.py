"""`python -m tests.bench.mirror_soak`: mirrored volumes under random fault sequences.

The long form of tests/integration/test_mirror_faults.py's general rule: for every
seed, a mirrored volume (2 or 3 zones, alternating) runs a verified-data writer while
mirror.testkit.fault_sequence cuts and heals zones, SIGKILLs and restarts replicas and
kills the frontend worker at random points; then everything is healed and checked:
every acknowledged block on the device and on every replica, identical replicas.
Needs root.

Runtime: about 20 s per seed at the defaults (TDM_SOAK_STEPS=12), so the default 30
seeds take about 10 minutes; TDM_SOAK_SEEDS=first:last picks them (default 100:130),
TDM_SOAK_ZONES=2 or 3 fixes the zone count, TDM_SOAK_IO_TIMEOUT_S (default 1.0, as in
CI) the frontend's io timeout, which every pause of a sequence scales with, and
TDM_SOAK_MIN_IN_SYNC (default 1; 2 = majority with 3 zones) the replicas I/O needs. Prints one
line per seed and a final JSON line; exits 1 if any seed failed (its actions and the
failure are printed, and its logs are kept in /tmp/tdm-soak-logs-SEED).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback

from mirror.spec import FrontendTuning
from mirror.testkit import Cluster, VerifiedWriter, fault_sequence
from tests.support import cleanup_tree

PORT = 7600
BLOCKS = 8192
IO_TIMEOUT_S = float(os.environ.get("TDM_SOAK_IO_TIMEOUT_S", "1.0"))
MIN_IN_SYNC = int(os.environ.get("TDM_SOAK_MIN_IN_SYNC", "1"))  # 2: majority with 3 zones


def one(seed: int, zones: int, steps: int) -> tuple[bool, str, float]:
    tmp = tempfile.mkdtemp(prefix=f"tdm-soak-{seed}-", dir="/tmp")
    tuning = FrontendTuning(io_timeout_s=IO_TIMEOUT_S, reconnect_interval_s=0.2,
                            min_in_sync=min(MIN_IN_SYNC, zones - 1))
    c = Cluster(tmp, zones=zones, port=PORT, tuning=tuning)
    actions: list[str] = []
    t0 = time.monotonic()
    ok, why = False, ""
    try:
        dev = c.up(f"vol-soak-{seed}")
        w = VerifiedWriter(dev, BLOCKS).start()
        try:
            w.wait_writes(200)
            actions = fault_sequence(c, seed, steps, say=lambda s: None)
            w.wait_writes(200, timeout_s=60)
        finally:
            w.stop()
        c.check(w, allow_errors=True)
        ok = True
    except Exception:
        why = traceback.format_exc(limit=3)
    finally:
        try:
            c.down()
        finally:
            if not ok:
                why = f"{why}\nactions: {actions}\nlogs: {keep_logs(tmp, seed)}"
            cleanup_tree(tmp)  # unmounts and detaches whatever is left, then removes it
    return ok, why, time.monotonic() - t0


def keep_logs(tmp: str, seed: int) -> str:
    """Copy the worker's and replicas' logs of a failed seed out of its directory."""
    keep = f"/tmp/tdm-soak-logs-{seed}"
    shutil.rmtree(keep, ignore_errors=True)
    for root, dirs, files in os.walk(tmp):
        dirs[:] = [d for d in dirs if d != "mnt"]  # a FUSE mount with no worker would hang us
        for name in files:
            if name.endswith(".log"):
                dst = os.path.join(keep, os.path.relpath(root, tmp))
                os.makedirs(dst, exist_ok=True)
                try:
                    shutil.copy(os.path.join(root, name), dst)
                except OSError:
                    pass
    return keep


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (namespaces, FUSE, loop devices)", file=sys.stderr)
        return 2
    first, _, last = os.environ.get("TDM_SOAK_SEEDS", "100:130").partition(":")
    steps = int(os.environ.get("TDM_SOAK_STEPS", "12"))
    fixed = os.environ.get("TDM_SOAK_ZONES")
    results = []
    for seed in range(int(first), int(last or first)):
        zones = int(fixed) if fixed else 2 + seed % 2
        ok, why, took = one(seed, zones, steps)
        results.append({"seed": seed, "zones": zones, "ok": ok, "seconds": round(took, 1)})
        print(f"seed {seed} zones {zones}: {'ok' if ok else 'FAILED'} in {took:.1f}s", flush=True)
        if not ok:
            print(why, flush=True)
    failed = [r["seed"] for r in results if not r["ok"]]
    print(json.dumps({"seeds": len(results), "failed": failed, "steps": steps,
                      "io_timeout_s": IO_TIMEOUT_S, "min_in_sync": MIN_IN_SYNC,
                      "seconds": round(sum(r["seconds"] for r in results), 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
