"""The control plane's handle on one mirrored volume on this node.

Frontend.start() mounts the one-file FUSE filesystem (fd holder process),
starts the data-path worker and puts a direct-I/O loop device on the file;
device_path is then an ordinary block device for mkfs/mount/publish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from engine.errors import Busy, Unavailable
from engine.loopdev import LoopDevices

from . import fuse_mount, procs
from .spec import FrontendTuning, ReplicaAddr, ReplicaState, ReplicaStatus

FILE_NAME = "volume"
_DEFAULT_TUNING = FrontendTuning()  # frozen: one shared default instance, as before


@dataclasses.dataclass(frozen=True)
class FrontendStatus:
    volume_id: str
    generation: int
    fenced: bool
    replicas: tuple[ReplicaStatus, ...]
    worker_pid: int


class Frontend:
    def __init__(self, volume_id: str, size_bytes: int, replicas: list[ReplicaAddr],
                 arbiter_url: str, state_dir: str, key_path: str, netns: str | None = None,
                 tuning: FrontendTuning = _DEFAULT_TUNING,
                 preferred_read_replica: str | None = None,
                 loops: LoopDevices | None = None, generation: int = 0,
                 worker_module: str = "mirror.frontend_worker",
                 extra: dict[str, Any] | None = None):
        """generation: the one the volume was published at (0: take the next one).
        worker_module: the data path's entry point (a cluster wraps it with its arbiter
        and lease: control/frontend_main.py); extra: more configuration for that entry
        point, kept in the same file."""
        self.volume_id = volume_id
        self.loops = loops or LoopDevices()
        self.size_bytes = size_bytes
        self.replicas = list(replicas)
        self.state_dir = os.path.abspath(state_dir)
        self.mountpoint = os.path.join(self.state_dir, "mnt")
        self.config_path = os.path.join(self.state_dir, "frontend.json")
        self._cfg: dict[str, Any] = {
            "volume_id": volume_id, "size_bytes": size_bytes, "state_dir": self.state_dir,
            "replicas": [dataclasses.asdict(r) for r in replicas], "key_path": key_path,
            "arbiter_url": arbiter_url, "netns": netns, "tuning": dataclasses.asdict(tuning),
            "preferred_read_replica": preferred_read_replica, "generation": generation,
            "worker_module": worker_module, **(extra or {})}
        self.worker_module = worker_module
        self.holder: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.device_path: str | None = None

    @classmethod
    def adopt(cls, state_dir: str, loops: LoopDevices | None = None) -> Frontend:
        """A handle on a frontend that is already running (started by an earlier agent,
        which may have lived in another container and mount namespace): its holder and
        worker outlive whoever started them. Its processes are found through its control
        socket and its loop device through the kernel, by the file it serves."""
        with open(os.path.join(state_dir, "frontend.json")) as f:
            cfg = json.load(f)
        fe = cls(cfg["volume_id"], cfg["size_bytes"],
                 [ReplicaAddr(**r) for r in cfg["replicas"]], cfg["arbiter_url"],
                 cfg["state_dir"], cfg["key_path"], cfg.get("netns"),
                 FrontendTuning(**cfg.get("tuning", {})), cfg.get("preferred_read_replica"),
                 loops, int(cfg.get("generation", 0)),
                 cfg.get("worker_module", "mirror.frontend_worker"))
        fe._cfg = cfg
        devices = fe.loops.by_backing_file(fe.file_path)
        fe.device_path = devices[0].path if devices else None
        return fe

    def running(self) -> bool:
        """Whether the data path answers (whoever started it)."""
        try:
            self.control({"op": "status"}, timeout_s=2.0)
        except Unavailable:
            return False
        return True

    @property
    def file_path(self) -> str:
        return os.path.join(self.mountpoint, FILE_NAME)

    # --- lifecycle -------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        self._save_config()
        holder_sock = os.path.join(self.state_dir, "holder.sock")
        if os.path.exists(holder_sock):
            os.unlink(holder_sock)
        self.holder = subprocess.Popen(
            [sys.executable, "-m", "mirror.fdholder", "--mountpoint", self.mountpoint,
             "--socket", holder_sock, "--name", f"tandem-{self.volume_id}"],
            stdout=subprocess.DEVNULL,
            # the parent's copy of the log fd stays open (unchanged behaviour)
            stderr=open(os.path.join(self.state_dir, "holder.log"), "ab"),  # noqa: SIM115
            start_new_session=True, cwd=_package_root())
        self._pid_file("holder.pid", self.holder.pid)
        fuse_mount.wait_for(
            lambda: fuse_mount.is_mounted(self.mountpoint) and os.path.exists(holder_sock),
            timeout_s, "the FUSE mount")
        self.start_worker(timeout_s)
        # direct I/O or nothing: a buffered loop device serialises writes (strict: refused -> error)
        self.device_path = self.loops.attach(self.file_path, direct_io=True, strict_direct_io=True,
                                             timeout_s=timeout_s).path
        return self.device_path

    def start_worker(self, timeout_s: float = 30.0) -> None:
        ctl = os.path.join(self.state_dir, "control.sock")
        if os.path.exists(ctl):
            os.unlink(ctl)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", self.worker_module, "--config", self.config_path],
            stdout=subprocess.DEVNULL,
            # the parent's copy of the log fd stays open (unchanged behaviour)
            stderr=open(os.path.join(self.state_dir, "worker.log"), "ab"),  # noqa: SIM115
            start_new_session=True, cwd=_package_root())
        self._pid_file("worker.pid", self.worker.pid)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.worker.poll() is not None:
                raise Unavailable(f"frontend worker exited {self.worker.returncode}; "
                                  f"see {self.state_dir}/worker.log")
            try:
                self.control({"op": "status"})
                return
            except (Unavailable, OSError):
                if time.monotonic() > deadline:
                    raise Unavailable("frontend worker did not come up") from None
                time.sleep(0.05)

    def kill_worker(self) -> None:
        """Crash the data path (tests, upgrades): the holder keeps the mount alive."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGKILL)
            self.worker.wait()

    def restart_worker(self, timeout_s: float = 30.0) -> None:
        self.kill_worker()
        self.start_worker(timeout_s)

    def stop(self) -> None:
        """Idempotent: detach the loop device, unmount, stop worker and holder.

        Every step runs even if an earlier one failed (nothing is left behind);
        the first failure is raised at the end."""
        errors: list[BaseException] = []
        if self.device_path:
            try:
                self.loops.detach(self.device_path)
                self.device_path = None
            except Exception as e:
                errors.append(e)
        if self.worker is not None and self.worker.poll() is None:
            try:
                self.control({"op": "shutdown"})
                self.worker.wait(timeout=15)
            except (Unavailable, OSError, subprocess.TimeoutExpired):
                self.worker.kill()
                self.worker.wait()
        elif self.worker is None:  # adopted: not our child, reached through its pid files
            self._stop_adopted("worker.pid", "shutdown")
        try:
            if fuse_mount.is_mounted(self.mountpoint):
                fuse_mount.umount_lazy(self.mountpoint)
        except OSError as e:
            errors.append(e)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        elif self.holder is None:
            self._stop_adopted("holder.pid", None)
        if errors:
            raise errors[0]

    def _pid_file(self, name: str, pid: int) -> None:
        with open(os.path.join(self.state_dir, name), "w") as f:
            f.write(f"{pid}\n")

    def _stop_adopted(self, pid_file: str, control_op: str | None,
                      timeout_s: float = 15.0) -> None:
        """Stop a process an earlier agent started: politely first (control op), then
        SIGKILL; its pid is checked against its command line (pids get reused)."""
        try:
            with open(os.path.join(self.state_dir, pid_file)) as f:
                pid = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return
        if not procs.alive(pid, self.state_dir):
            return
        if control_op:
            try:
                self.control({"op": control_op})
            except Unavailable:
                pass
        deadline = time.monotonic() + timeout_s
        while procs.alive(pid, self.state_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if procs.alive(pid, self.state_dir):
            os.kill(pid, signal.SIGKILL)

    # --- control ---------------------------------------------------------------
    def control(self, req: dict, timeout_s: float = 5.0) -> dict:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout_s)
        try:
            s.connect(os.path.join(self.state_dir, "control.sock"))
            s.sendall((json.dumps(req) + "\n").encode())
            line = s.makefile("rb").readline()
        except OSError as e:
            raise Unavailable(f"frontend control: {e}") from e
        finally:
            s.close()
        resp = json.loads(line or b"{}")
        if "error" in resp:
            raise (Busy if resp.get("kind") == "Busy" else Unavailable)(resp["error"])
        return resp

    def status(self) -> FrontendStatus:
        d = self.control({"op": "status"})
        return FrontendStatus(d["volume_id"], d["generation"], d["fenced"], tuple(
            ReplicaStatus(r["replica_id"], ReplicaState(r["state"]), r["connected"],
                          r["resync_done_bytes"], r["resync_total_bytes"])
            for r in d["replicas"]), d["pid"])

    def barrier(self, token: str, hold_s: float) -> tuple[list[str], int]:
        """Raise a write barrier and wait until it holds: new writes wait, those in flight
        drain, every replica syncs. Returns (the replicas identical at the barrier, the
        generation). It lets go by itself after hold_s (from now) unless resume() comes
        first. Unavailable when it cannot hold in that time (and it is let go)."""
        deadline = time.monotonic() + hold_s
        req = {"op": "barrier", "token": token, "timeout_s": hold_s}
        while True:
            got = self.control(req)
            if got["state"] == "held":
                return list(got["replicas"]), int(got["generation"])
            if time.monotonic() > deadline:
                self.resume(token)
                raise Unavailable(f"the writes of {self.volume_id} did not drain within "
                                  f"{hold_s} s ({got['state']}{': ' if got['why'] else ''}"
                                  f"{got['why']})")
            time.sleep(0.01)

    def resume(self, token: str) -> bool:
        """Let the barrier go; whether it held from barrier() until now."""
        return bool(self.control({"op": "resume", "token": token})["held"])

    def grow(self, size_bytes: int) -> int:
        """The volume grew (its replicas first): the data path and the FUSE file take the
        new size; a restarted worker starts at it too. Returns the size now served."""
        got = int(self.control({"op": "grow", "size_bytes": size_bytes})["size_bytes"])
        if got != self._cfg["size_bytes"]:
            self._cfg["size_bytes"] = self.size_bytes = got
            self._save_config()
        return got

    def add_replica(self, addr: ReplicaAddr) -> None:
        self.control({"op": "add_replica", "replica": dataclasses.asdict(addr)})
        self._cfg["replicas"].append(dataclasses.asdict(addr))
        self._save_config()

    def remove_replica(self, replica_id: str) -> None:
        self.control({"op": "remove_replica", "replica_id": replica_id})
        self._cfg["replicas"] = [r for r in self._cfg["replicas"] if r["replica_id"] != replica_id]
        self._save_config()

    def _save_config(self) -> None:
        """A restarted worker must see the same membership."""
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._cfg, f)
        os.replace(tmp, self.config_path)

    def replace_replica(self, old_replica_id: str, new: ReplicaAddr) -> None:
        self.add_replica(new)
        self.remove_replica(old_replica_id)

    def wait_in_sync(self, timeout_s: float = 60.0) -> FrontendStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if all(r.state == ReplicaState.IN_SYNC and r.connected for r in st.replicas):
                return st
            if time.monotonic() > deadline:
                raise Unavailable(f"replicas not in sync: {st.replicas}")
            time.sleep(0.1)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
