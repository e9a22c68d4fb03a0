"""A node's part in mirrored volumes: the replicas it serves and the frontends it runs.

ReplicaHost: one replica service process per node (mirror/replica_main.py) serves every
replica this node holds. A replica's bytes are a volume of the node's own pool (an engine
backing: counted in the pool's usage, snapshotted like any volume); its maps and metadata
sit beside it under <pool>/replicas/<volume_id>/, whose `data` links to the backing.

FrontendHost: the frontends of the mirrored volumes staged on this node, one per volume,
under <state>/frontends/<volume_id>/. They run in processes of their own (fd holder and
data-path worker, started in new sessions), so they outlive the node plugin: a restarted
agent, in a new container and mount namespace, adopts them instead of starting new ones.

Both kinds of process are found again through pid files checked against the process's
command line, never through our own memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from engine.errors import EngineError, InUse, NotFound, Unavailable
from mirror import client as replica_client
from mirror import procs
from mirror.frontend import Frontend
from mirror.replica_store import ReplicaVolume
from mirror.spec import FrontendTuning, ReplicaAddr

log = logging.getLogger(__name__)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_alive = procs.alive  # a pid from a pid file, checked against its command line


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@dataclass(frozen=True)
class ClusterAccess:
    """How a frontend reaches the cluster store (its arbiter and its lease)."""

    store_url: str
    store_ca: str = ""
    store_cert: str = ""
    store_key: str = ""
    store_namespace: str = "/tandem/"
    store_timeout_s: float = 5.0
    lease_ttl_s: int = 10
    fence_margin_s: float = 3.0


class ReplicaHost:
    def __init__(self, replicas_dir: str, listen: str, key_path: str, netns: str | None = None):
        self.replicas_dir = replicas_dir
        self.listen = listen  # host:port the other zones' frontends reach
        self.key_path = key_path
        self.netns = netns
        self.pid_path = os.path.join(replicas_dir, "service.pid")

    # --- the service process ---------------------------------------------------------
    def running(self) -> bool:
        return _alive(_read_pid(self.pid_path), self.replicas_dir)

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the replica service unless one already serves this node (adopted)."""
        os.makedirs(self.replicas_dir, mode=0o700, exist_ok=True)
        if self.running():
            return
        argv = [sys.executable, "-m", "mirror.replica_main", "--pool", self.replicas_dir,
                "--listen", self.listen, "--key-file", self.key_path]
        if self.netns:
            argv += ["--netns", self.netns]
        # tests: arm the slow-replica hook (SIGUSR1 switches it on; this kernel has no netem)
        delay_ms = os.environ.get("TANDEM_TEST_REPLICA_DELAY_MS")
        if delay_ms:
            argv += ["--test-delay-ms", delay_ms]
        log_path = os.path.join(self.replicas_dir, "service.log")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file,
                                    cwd=PACKAGE_ROOT, start_new_session=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = proc.stdout.readline()  # "listening ..." once it accepts
        proc.stdout.close()
        if not line.startswith(b"listening") or time.monotonic() > deadline:
            proc.kill()
            raise Unavailable(f"the replica service did not start (see {log_path})")
        with open(self.pid_path, "w") as f:
            f.write(f"{proc.pid}\n")

    def revive(self) -> bool:
        """Start the service again if it died (the agent's supervisor calls this every few
        seconds): True when it was restarted. Frontends reconnect to it on their own."""
        if self.running():
            return False
        log.warning("the replica service had died: starting it again")
        self.start()
        return True

    def stop(self) -> None:
        pid = _read_pid(self.pid_path)
        if _alive(pid, self.replicas_dir):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid, self.replicas_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid, self.replicas_dir):
                os.kill(pid, signal.SIGKILL)

    # --- replicas ----------------------------------------------------------------------
    def create(self, volume_id: str, size_bytes: int, data_path: str,
               rebuild: bool = False) -> None:
        """The replica's maps beside its bytes (an existing pool volume); idempotent.
        rebuild: a replacement for a lost replica. Its dirty map names every region, and a
        frontend treats every region any replica's dirty map names as missing on the
        replicas not in sync: whichever frontend serves the volume next copies it whole."""
        if os.path.exists(os.path.join(self.replicas_dir, volume_id, "meta.json")):
            return
        vol = ReplicaVolume.create(self.replicas_dir, volume_id, size_bytes, data_path)
        try:
            if rebuild:
                vol.start_tracking()
                vol.mark_dirty(range(vol.regions))
        finally:
            vol.close()

    def exists(self, volume_id: str) -> bool:
        return os.path.exists(os.path.join(self.replicas_dir, volume_id, "meta.json"))

    def _client(self) -> replica_client.ReplicaClient:
        host, _, port = self.listen.rpartition(":")
        return replica_client.ReplicaClient((host, int(port)), _key(self.key_path), 5.0)

    def delete(self, volume_id: str) -> None:
        """Through the service, which refuses a replica a frontend has open (InUse)."""
        if not self.exists(volume_id):
            shutil.rmtree(os.path.join(self.replicas_dir, volume_id), ignore_errors=True)
            return
        c = self._client()
        try:
            c.delete_volume(volume_id)
        except replica_client.ReplicaError as e:
            raise InUse(f"replica {volume_id} is open: {e}") from e
        finally:
            c.close()

    def grow(self, volume_id: str, size_bytes: int) -> dict:
        """Grow the replica's maps and metadata (its bytes, a pool volume, first), through
        the service: a frontend may have it open. Returns its info after."""
        c = self._client()
        try:
            return c.grow_volume(volume_id, size_bytes)
        finally:
            c.close()

    def held(self, volume_id: str) -> dict | None:
        """What the replica's files say (size, generation, dirty regions, activity-log
        extents), read without the service; None: no such replica. While a frontend has
        it open the service may hold newer maps (clears are lazy): the counts are then an
        upper bound."""
        path = os.path.join(self.replicas_dir, volume_id)
        if not os.path.exists(os.path.join(path, "meta.json")):
            return None
        vol = ReplicaVolume(path)
        try:
            return vol.info()
        finally:
            vol.close()

    def fence(self, volume_id: str, generation: int) -> int:
        """Raise the replica's generation: every connection of an older frontend is cut
        and refused from now on. Returns the replica's generation after."""
        c = self._client()
        try:
            info = c.open(volume_id, generation, writer=False)
        finally:
            c.close()
        return int(info.get("generation", generation))


def _key(path: str) -> bytes:
    from mirror import auth
    return auth.load_key(path)


class FrontendHost:
    def __init__(self, frontends_dir: str, key_path: str, node_id: str,
                 cluster: ClusterAccess, netns: str | None = None,
                 tuning: FrontendTuning | None = None):
        self.frontends_dir = frontends_dir
        self.key_path = key_path
        self.node_id = node_id
        self.cluster = cluster
        self.netns = netns
        self.tuning = tuning or FrontendTuning()
        self._handles: dict[str, Frontend] = {}
        # one operation at a time per volume: the supervisor never restarts a worker that
        # a stop is ending, nor one that ensure() is starting
        self._locks: defaultdict[str, threading.RLock] = defaultdict(threading.RLock)
        self._next_try: dict[str, tuple[float, float]] = {}  # volume: (when, backoff)

    def _dir(self, volume_id: str) -> str:
        return os.path.join(self.frontends_dir, volume_id)

    def _adopt(self, volume_id: str) -> Frontend | None:
        fe = self._handles.get(volume_id)
        if fe is not None:
            return fe
        if not os.path.exists(os.path.join(self._dir(volume_id), "frontend.json")):
            return None
        fe = Frontend.adopt(self._dir(volume_id))
        self._handles[volume_id] = fe
        return fe

    def ensure(self, volume_id: str, size_bytes: int, replicas: list[ReplicaAddr],
               generation: int, min_in_sync: int, preferred_replica: str | None = None,
               timeout_s: float = 60.0) -> str:
        with self._locks[volume_id]:
            return self._ensure(volume_id, size_bytes, replicas, generation, min_in_sync,
                                preferred_replica, timeout_s)

    def _ensure(self, volume_id: str, size_bytes: int, replicas: list[ReplicaAddr],
                generation: int, min_in_sync: int, preferred_replica: str | None,
                timeout_s: float) -> str:
        """The device of the volume's frontend on this node, started at `generation` or
        adopted when it already runs at it. A frontend of an older generation (the volume
        was published here again) is stopped first."""
        fe = self._adopt(volume_id)
        if fe is not None:
            cfg = fe._cfg  # noqa: SLF001 - the frontend's own saved configuration
            if int(cfg.get("generation", 0)) == generation and fe.running() \
                    and fe.device_path:
                return fe.device_path
            self.stop(volume_id)
        state_dir = self._dir(volume_id)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        tuning = dataclasses.replace(self.tuning, min_in_sync=min_in_sync)
        fe = Frontend(volume_id, size_bytes, replicas, "store:cluster", state_dir,
                      self.key_path, self.netns, tuning, preferred_replica,
                      generation=generation, worker_module="control.frontend_main",
                      extra={"cluster": {**dataclasses.asdict(self.cluster),
                                         "node_id": self.node_id}})
        self._handles[volume_id] = fe
        try:
            return fe.start(timeout_s)
        except BaseException:
            self.stop(volume_id)
            raise

    def device(self, volume_id: str) -> str | None:
        fe = self._adopt(volume_id)
        return fe.device_path if fe is not None and fe.running() else None

    def stop(self, volume_id: str) -> None:
        """Clean stop (the activity log emptied, state 'stopped' in etcd); idempotent."""
        with self._locks[volume_id]:
            fe = self._adopt(volume_id)
            if fe is not None:
                fe.stop()
            self._handles.pop(volume_id, None)
            self._next_try.pop(volume_id, None)
            shutil.rmtree(self._dir(volume_id), ignore_errors=True)

    def adopt_all(self) -> list[str]:
        """At start-up: take over the frontends an earlier agent left running; restart a
        data path whose worker died while its FUSE mount (the holder) lived."""
        adopted: list[str] = []
        if not os.path.isdir(self.frontends_dir):
            return adopted
        for volume_id in sorted(os.listdir(self.frontends_dir)):
            try:
                fe = self._adopt(volume_id)
            except (OSError, ValueError, EngineError) as e:
                log.warning("frontend of %s cannot be adopted: %s", volume_id, e)
                continue
            if fe is None:
                continue
            if not fe.running():
                try:
                    fe.start_worker()
                    log.warning("restarted the data path of %s (its worker had died)",
                                volume_id)
                except EngineError as e:
                    log.error("frontend of %s is down: %s", volume_id, e)
                    continue
            adopted.append(volume_id)
        return adopted

    def revive(self, now: float | None = None) -> list[str]:
        """Restart the data-path worker of every frontend here whose worker died (a crash,
        the OOM killer) while its FUSE mount lived: the kernel resends what the dead one
        had not answered, and the pod's I/O goes on. The agent's supervisor calls this
        every few seconds. A worker that dies again is retried with a growing delay
        (1 s doubling to 60 s): one that cannot start (fenced by a newer generation, the
        store away) does not spin. Returns the volumes whose worker was restarted."""
        now = time.monotonic() if now is None else now
        restarted: list[str] = []
        if not os.path.isdir(self.frontends_dir):
            return restarted
        for volume_id in sorted(os.listdir(self.frontends_dir)):
            when, backoff = self._next_try.get(volume_id, (0.0, 0.0))
            if now < when:
                continue
            lock = self._locks[volume_id]
            if not lock.acquire(blocking=False):  # ensure or stop at work on it
                continue
            try:
                if self._revive(volume_id):
                    restarted.append(volume_id)
                    backoff = min(60.0, max(1.0, backoff * 2))
                    self._next_try[volume_id] = (now + backoff, backoff)
            except (OSError, ValueError, EngineError) as e:
                backoff = min(60.0, max(1.0, backoff * 2))
                self._next_try[volume_id] = (now + backoff, backoff)
                log.error("the data path of %s is down and did not restart (next try in "
                          "%.0f s): %s", volume_id, backoff, e)
            finally:
                lock.release()
        return restarted

    def _revive(self, volume_id: str) -> bool:
        directory = self._dir(volume_id)
        if not os.path.exists(os.path.join(directory, "frontend.json")):
            return False  # being created or removed
        worker_pid = _read_pid(os.path.join(directory, "worker.pid"))
        if worker_pid and _alive(worker_pid, directory):
            if volume_id in self._next_try and self.device(volume_id):
                self._next_try.pop(volume_id, None)  # it came up and stayed: reset
            return False
        holder_pid = _read_pid(os.path.join(directory, "holder.pid"))
        if not (holder_pid and _alive(holder_pid, directory)):
            return False  # nothing to serve: the next stage or unstage cleans up
        fe = self._adopt(volume_id)
        if fe is None:
            return False
        if fe.worker is not None:
            fe.worker.poll()  # reap our own dead child
        log.warning("the data path worker of %s (pid %d) had died: starting it again",
                    volume_id, worker_pid)
        fe.start_worker()
        return True

    def set_replicas(self, volume_id: str, replicas: list[ReplicaAddr]) -> bool:
        """The running frontend serves exactly these replicas: new ones are added (a full
        rebuild), others removed. False when no frontend of the volume runs here."""
        with self._locks[volume_id]:
            return self._set_replicas(volume_id, replicas)

    def _set_replicas(self, volume_id: str, replicas: list[ReplicaAddr]) -> bool:
        fe = self._adopt(volume_id)
        if fe is None or not fe.running():
            return False
        current = {r["replica_id"] for r in fe._cfg["replicas"]}  # noqa: SLF001
        wanted = {r.replica_id for r in replicas}
        for addr in replicas:
            if addr.replica_id not in current:
                fe.add_replica(addr)
        for rid in current - wanted:
            fe.remove_replica(rid)
        return True

    def barrier(self, volume_id: str, token: str, hold_s: float) -> tuple[list[str], int] | None:
        """The running frontend's write barrier (Frontend.barrier); None when no frontend
        of the volume runs here."""
        fe = self._adopt(volume_id)
        if fe is None or not fe.running():
            return None
        return fe.barrier(token, hold_s)

    def resume(self, volume_id: str, token: str) -> bool:
        fe = self._adopt(volume_id)
        if fe is None:
            return False
        try:
            return fe.resume(token)
        except Unavailable:  # the worker died (and with it the barrier)
            return False

    def grow(self, volume_id: str, size_bytes: int) -> int:
        fe = self._adopt(volume_id)
        if fe is None:
            raise NotFound(f"no frontend of {volume_id} on {self.node_id}")
        return fe.grow(size_bytes)

    def status(self, volume_id: str):
        fe = self._adopt(volume_id)
        if fe is None:
            raise NotFound(f"no frontend of {volume_id} on {self.node_id}")
        return fe.status()
