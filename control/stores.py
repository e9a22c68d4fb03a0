"""Open the cluster store a `--store` flag names.

    sqlite:PATH                    the embedded store (all-in-one default: STATE_DIR/cluster.sqlite)
    etcd://HOST:PORT[,HOST:PORT]   etcd, plain
    etcds://HOST:PORT[,...]        etcd over TLS (CA, client certificate and key given apart)
"""

from __future__ import annotations

from dataclasses import dataclass

from control.store import Store
from engine.errors import InvalidSpec


@dataclass(frozen=True)
class StoreSpec:
    url: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout_s: float = 5.0


def open_store(spec: StoreSpec) -> Store:
    if spec.url.startswith("sqlite:"):
        from control.sqlite_store import SqliteStore
        path = spec.url[len("sqlite:"):]
        if not path.startswith("/"):
            raise InvalidSpec(f"--store {spec.url}: give an absolute path after sqlite:")
        return SqliteStore(path)
    if spec.url.startswith(("etcd://", "etcds://")):
        from control.etcd_store import EtcdStore
        return EtcdStore.from_url(spec.url, ca_file=spec.ca_file, cert_file=spec.cert_file,
                                  key_file=spec.key_file, timeout_s=spec.timeout_s)
    raise InvalidSpec(f"--store {spec.url!r}: expected sqlite:PATH, etcd://HOST:PORT,... or "
                      "etcds://HOST:PORT,...")
