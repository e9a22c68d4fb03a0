"""`python -m mirror.replica_main --pool DIR --listen HOST:PORT --key-file F [--netns NAME]
[--max-handshakes N] [--max-handshakes-per-source N] [--handshake-timeout-s S]`

Runs the replica service until SIGTERM. SIGUSR1/SIGUSR2 switch the test-only
slow-replica delay on/off (--test-delay-ms), since this kernel has no netem.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from . import auth, netns
from .replica_server import ReplicaService


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pool", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--netns")
    p.add_argument("--test-delay-ms", type=float, default=0.0)
    p.add_argument("--max-handshakes", type=int, default=512,
                   help="unauthenticated connections at a time (also bounded by RLIMIT_NOFILE)")
    p.add_argument("--max-handshakes-per-source", type=int, default=64)
    p.add_argument("--handshake-timeout-s", type=float, default=5.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replica %(levelname)s %(message)s")
    if args.netns:
        netns.enter(args.netns)
    svc = ReplicaService(args.pool, args.listen, auth.load_key(args.key_file),
                         args.max_handshakes, args.max_handshakes_per_source,
                         args.handshake_timeout_s)
    svc.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGUSR1,
                  lambda *_: setattr(svc, "test_delay_s", args.test_delay_ms / 1000))
    signal.signal(signal.SIGUSR2, lambda *_: setattr(svc, "test_delay_s", 0.0))
    print(f"listening {args.listen}", flush=True)
    while not done.wait(1.0):
        pass
    svc.stop()


if __name__ == "__main__":
    main()
