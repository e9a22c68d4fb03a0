"""The pool's IOPS capacity for guaranteed minima: measured once at the first start (a short
real measurement here; the full one and its stability are in tests/bench/capacity.py), kept
across restarts, shown, set and measured again with tandem-admin beside the running driver
(which holds the state lock all along), and effective at once."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from engine.qos import capacity
from proto import csi_pb2
from tests import support

GOLD = {"tier": "gold"}  # guarantees 2000 + 2000 IOPS


def admin(state_dir: str, *args: str) -> dict:
    """tandem-admin as an operator runs it: another process."""
    proc = subprocess.run([sys.executable, "-m", "csi.admin", "--state-dir", state_dir, *args],
                          cwd=support.REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def gold_capacity(d: support.InProcessDriver) -> int:
    return d.stubs.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(parameters=GOLD)).available_capacity


def test_measured_at_the_first_start_kept_then_set_and_measured_again_live(test_root):
    cfg = support.test_config(test_root, node_iops_capacity=0, capacity_measure_s=4)
    d = support.InProcessDriver(cfg)
    try:
        first = admin(cfg.state_dir, "capacity")
        assert first["source"] == capacity.MEASURED and first["iops"] > 100, first
        assert "median of the per-second IOPS over 4 s" in first["method"]
        assert first["per_second_iops"]["count"] >= capacity.MIN_SAMPLES and first["date"]
        assert d.driver.engine.iops_capacity == first["iops"]
        assert not glob.glob(os.path.join(cfg.pool_directory, capacity.SCRATCH_PREFIX + "*"))
    finally:
        d.close()

    d = support.InProcessDriver(cfg)  # a restart keeps the figure: nothing is measured
    try:
        assert admin(cfg.state_dir, "capacity", "show") == first
        # set by hand while the driver runs: admission follows at once
        assert admin(cfg.state_dir, "capacity", "set", "4000")["iops"] == 4000
        assert gold_capacity(d) > 0
        shown = admin(cfg.state_dir, "capacity", "set", "3999")
        assert shown["source"] == capacity.OPERATOR and shown["date"]
        assert gold_capacity(d) == 0
        # measured again on demand, beside the running driver
        again = admin(cfg.state_dir, "capacity", "measure", "--seconds", "4")
        assert again["source"] == capacity.MEASURED and again["date"] >= first["date"]
        assert d.driver.engine.iops_capacity == again["iops"]
    finally:
        d.close()


def test_the_flag_sets_the_figure_at_every_start(test_root):
    cfg = support.test_config(test_root, node_iops_capacity=5000)
    d = support.InProcessDriver(cfg)
    try:
        shown = admin(cfg.state_dir, "capacity")
        assert (shown["iops"], shown["source"]) == (5000, capacity.FLAG)
        admin(cfg.state_dir, "capacity", "set", "3000")
        assert gold_capacity(d) == 0  # 4000 guaranteed do not fit in 3000
    finally:
        d.close()
    d = support.InProcessDriver(cfg)
    try:
        assert admin(cfg.state_dir, "capacity")["iops"] == 5000
        assert gold_capacity(d) > 0
    finally:
        d.close()


def test_admin_refuses_a_state_dir_without_state(test_root):
    proc = subprocess.run([sys.executable, "-m", "csi.admin", "--state-dir", test_root,
                           "capacity"], cwd=support.REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no driver state" in proc.stderr
    assert not os.path.exists(os.path.join(test_root, "state.sqlite"))  # nothing made
