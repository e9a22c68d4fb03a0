"""The driver's state and pool hold every tenant's data: only their owner may read them.

An older release made `state.sqlite` and the pool image 0644 (any local user could read
every volume); now files are 0600 and directories 0700, and a start tightens what an older
release left looser, with a warning.
"""

from __future__ import annotations

import logging
import os
import signal
import stat

from csi.server import socket_path
from proto import csi_pb2
from tests import support
from tests.integration.helpers import create_request


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def open_to_others(top: str) -> list[str]:
    """Every path under top (top included) with a group or other permission bit."""
    found = []
    for dirpath, _dirs, filenames in os.walk(top):
        for path in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            if not os.path.islink(path) and mode(path) & 0o077:
                found.append(f"{path} {mode(path):04o}")
    return found


def make_some_state(d: support.InProcessDriver) -> None:
    """A volume and a snapshot of it, so every kind of pool object exists."""
    vol = d.stubs.controller.CreateVolume(create_request("perm", block=True)).volume
    d.stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="perm-snap", source_volume_id=vol.volume_id))


def test_state_pool_and_socket_are_owner_only(test_root):
    cfg = support.test_config(test_root)
    d = support.InProcessDriver(cfg)
    try:
        make_some_state(d)
        state = cfg.state_dir
        for path in (state, cfg.pool_directory, f"{cfg.pool_directory}/volumes",
                     f"{cfg.pool_directory}/snapshots"):
            assert mode(path) == 0o700, f"{path} {mode(path):04o}"
        for path in (cfg.store_path, cfg.store_path + "-wal", cfg.store_path + "-shm",
                     cfg.lock_path, cfg.pool_image_path, socket_path(cfg.endpoint)):
            assert mode(path) == 0o600, f"{path} {mode(path):04o}"
        assert open_to_others(state) == []  # nothing else the driver made is open either
    finally:
        d.close()


def test_a_start_tightens_what_an_older_release_left_open(test_root, caplog):
    cfg = support.test_config(test_root)
    proc = support.DriverProcess(test_root).start()
    try:
        stubs = proc.stubs()
        vol = stubs.controller.CreateVolume(create_request("perm", block=True)).volume
        stubs.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="perm-snap", source_volume_id=vol.volume_id))
        stubs.channel.close()
    finally:
        proc.stop(signal.SIGKILL)  # a crash leaves state.sqlite-wal and -shm behind
    # the modes an older release made (the pool stays mounted across restarts)
    loose = {cfg.state_dir: 0o755, cfg.pool_directory: 0o755,
             f"{cfg.pool_directory}/volumes": 0o755, f"{cfg.pool_directory}/snapshots": 0o755,
             cfg.store_path: 0o644, cfg.store_path + "-wal": 0o644,
             cfg.store_path + "-shm": 0o644, cfg.lock_path: 0o644, cfg.pool_image_path: 0o644}
    for path, m in loose.items():
        os.chmod(path, m)
    caplog.set_level(logging.WARNING)
    d = support.InProcessDriver(cfg)
    try:
        assert open_to_others(cfg.state_dir) == []
        warned = "\n".join(r.getMessage() for r in caplog.records)
        for path, m in loose.items():
            assert f"{path} had mode {m:04o}" in warned, warned
        d.stubs.controller.CreateVolume(create_request("after"))  # and it works as before
    finally:
        d.close()
