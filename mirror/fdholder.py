"""`python -m mirror.fdholder --mountpoint M --socket S --name N`

Opens /dev/fuse, mounts M with it and keeps the descriptor for as long as the
mount lives. Workers get the fd ('get'), record the negotiated INIT ('set_init'),
and the frontend ends it ('exit'). Tiny on purpose: it must outlive workers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket

from . import fuse_mount, nodesafety


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--name", default="tandem")
    args = p.parse_args()
    nodesafety.harden(lock_memory=False)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(args.socket)
    os.chmod(args.socket, 0o600)
    srv.listen(8)
    fuse_mount.mount_fuse(fd, args.mountpoint, args.name)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    state: dict = {"init": None}
    while True:
        conn, _ = srv.accept()
        try:
            msg = json.loads(conn.recv(65536) or b"{}")
            op = msg.get("op")
            if op == "get":
                socket.send_fds(conn, [json.dumps(state).encode()], [fd])
            elif op == "set_init":
                state["init"] = msg["init"]
                conn.send(b"{}")
            elif op == "exit":
                conn.send(b"{}")
                return
            else:
                conn.send(json.dumps({"error": f"unknown op {op}"}).encode())
        except (OSError, ValueError):
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
