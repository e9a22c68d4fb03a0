"""`python -m mirror.frontend_worker --config STATE_DIR/frontend.json`

The frontend's data path: one epoll loop over /dev/fuse (borrowed from the fd
holder), the replica connections, helper completions and a control socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import socket
import sys
import time
import uuid
from typing import Protocol

from . import auth, fuse_mount, netns, nodesafety
from .arbiter import Arbiter, open_arbiter
from .core import MirrorCore
from .fuse_server import FuseServer
from .spec import FrontendConfig, FrontendTuning, ReplicaAddr

log = logging.getLogger("mirror.worker")


def load_config(path: str) -> FrontendConfig:
    with open(path) as f:
        d = json.load(f)
    return FrontendConfig(
        volume_id=d["volume_id"], size_bytes=d["size_bytes"],
        replicas=tuple(ReplicaAddr(**r) for r in d["replicas"]), state_dir=d["state_dir"],
        key_path=d["key_path"], arbiter_url=d["arbiter_url"], netns=d.get("netns"),
        tuning=FrontendTuning(**d.get("tuning", {})),
        preferred_read_replica=d.get("preferred_read_replica"),
        generation=int(d.get("generation", 0)))


class Guard(Protocol):
    """Something the frontend may only serve under (a lease): checked at every tick."""

    def check(self, core: MirrorCore) -> str:
        """'' while serving is allowed; else why not (the frontend then fences itself).
        The core is there for what the replicas say (MirrorCore.proof_of_ownership)."""
        ...


class Reporter(Protocol):
    """Something told the replicas' state at every tick (a cluster publishes it); it must
    return at once (anything slow goes to a thread of its own)."""

    def tick(self, core: MirrorCore) -> None: ...


class Worker:
    def __init__(self, cfg: FrontendConfig, arbiter: Arbiter | None = None,
                 guard: Guard | None = None, reporter: Reporter | None = None):
        self.cfg = cfg
        self.arbiter = arbiter or open_arbiter(cfg.arbiter_url)
        self.guard = guard
        self.reporter = reporter
        self.sd = cfg.state_dir
        self.stopping = False
        self.stop_deadline = 0.0

    def run(self) -> None:
        cfg = self.cfg
        if cfg.tuning.node_safety:
            nodesafety.harden()
        state, fuse_fd = fuse_mount.holder_request(os.path.join(self.sd, "holder.sock"),
                                                   {"op": "get"})
        assert fuse_fd is not None
        os.set_blocking(fuse_fd, False)
        ep = select.epoll()
        self.fuse = FuseServer(fuse_fd, cfg.size_bytes, cfg.tuning)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.core = MirrorCore(cfg, auth.load_key(cfg.key_path), self.arbiter,
                               self.fuse.reply, ep, owner, reply_fd=fuse_fd)
        self.core.start()
        if state.get("init") is None:
            init = self.fuse.handshake()
            fuse_mount.holder_request(os.path.join(self.sd, "holder.sock"),
                                      {"op": "set_init", "init": init})
        else:
            log.info("taking over a live FUSE connection; "
                     "asking the kernel to resend lost requests")
            self.fuse.resend()
        ctl_path = os.path.join(self.sd, "control.sock")
        if os.path.exists(ctl_path):
            os.unlink(ctl_path)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(ctl_path)
        os.chmod(ctl_path, 0o600)
        ctl.listen(8)
        ctl.setblocking(False)
        self.fuse.attach(self.core)  # the DataPath reads /dev/fuse from here on
        ep.register(self.core.helpers.wake_fd, select.EPOLLIN)
        ep.register(ctl.fileno(), select.EPOLLIN)
        fuse, core, helpers_fd, ctl_fd = (
            self.fuse, self.core, self.core.helpers.wake_fd, ctl.fileno())
        print("ready", flush=True)
        while not fuse.destroyed:
            for fd, _ev in core.poll(100):  # FUSE and replica events are handled inside
                if fd == helpers_fd:
                    core.helpers.drain()
                elif fd == ctl_fd:
                    self._control(ctl)
            core.tick()
            if self.reporter is not None:
                self.reporter.tick(core)
            if self.guard is not None and not core.fenced:
                why = self.guard.check(core)
                if why:
                    core.self_fence(why)
            if self.stopping and (core.idle() or time.monotonic() > self.stop_deadline):
                break
        if self.stopping:
            ep.unregister(fuse_fd)  # no new requests: the loop device is gone
            ep.unregister(ctl_fd)
            core.clear_activity_log()
            end = time.monotonic() + 2.0
            while core.pending() and time.monotonic() < end:
                for fd, _ev in core.poll(100):
                    if fd == helpers_fd:
                        core.helpers.drain()
        core.close()

    def _control(self, ctl: socket.socket) -> None:
        try:
            conn, _ = ctl.accept()
        except BlockingIOError:
            return
        conn.settimeout(2.0)
        try:
            req = json.loads(conn.makefile("rb").readline() or b"{}")
            conn.sendall((json.dumps(self._handle(req)) + "\n").encode())
        except Exception as e:  # the control channel must never take the data path down
            try:
                conn.sendall((json.dumps({"error": f"{type(e).__name__}: {e}",
                                          "kind": type(e).__name__}) + "\n").encode())
            except OSError:
                pass
        finally:
            conn.close()

    def _handle(self, req: dict) -> dict:
        core = self.core
        op = req.get("op")
        if op == "status":
            rec = core.record
            return {"volume_id": self.cfg.volume_id, "generation": rec.generation if rec else 0,
                    "fenced": core.fenced, "pid": os.getpid(),
                    "replicas": [{"replica_id": s.replica_id, "state": s.state.value,
                                  "connected": s.connected,
                                  "resync_done_bytes": s.resync_done_bytes,
                                  "resync_total_bytes": s.resync_total_bytes}
                                 for s in core.status()],
                    "datapath": core.dp.stats()}
        if op == "add_replica":
            core.add_replica(ReplicaAddr(**req["replica"]))
            return {}
        if op == "remove_replica":
            core.remove_replica(req["replica_id"])
            return {}
        if op == "barrier":  # raise a write barrier, or poll it until "held"
            return core.barrier_begin(str(req["token"]), float(req.get("timeout_s", 10.0)))
        if op == "resume":
            return {"held": core.barrier_end(str(req["token"]))}
        if op == "grow":
            core.grow(int(req["size_bytes"]))
            self.fuse.grow(core.size)
            return {"size_bytes": core.size}
        if op == "shutdown":
            if core.barrier is not None:  # what it held back must be answered, not lost
                core.barrier_end(core.barrier.token)
            self.stopping = True
            self.stop_deadline = time.monotonic() + 10.0
            return {}
        return {"error": f"unknown op {op}"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s frontend %(levelname)s %(name)s %(message)s")
    cfg = load_config(args.config)
    if cfg.netns:
        netns.enter(cfg.netns)  # before any thread: setns is per thread
    Worker(cfg).run()


if __name__ == "__main__":
    main()
