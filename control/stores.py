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
    namespace: str = "/tandem/"  # etcd: every key starts with it (clusters sharing an etcd)


def open_store(spec: StoreSpec) -> Store:
    if spec.url.startswith("sqlite:"):
        from control.sqlite_store import SqliteStore
        path = spec.url[len("sqlite:"):]
        if not path.startswith("/"):
            raise InvalidSpec(f"--store {spec.url}: give an absolute path after sqlite:")
        return SqliteStore(path)
    if spec.url.startswith(("etcd://", "etcds://")):
        from control.etcd_client import EtcdConfig
        from control.etcd_store import EtcdStore
        try:
            config = EtcdConfig.from_url(
                spec.url, ca_file=spec.ca_file or None, cert_file=spec.cert_file or None,
                key_file=spec.key_file or None, timeout_s=spec.timeout_s,
                namespace=spec.namespace)
        except ValueError as e:
            raise InvalidSpec(f"--store: {e}") from None
        return EtcdStore(config)
    raise InvalidSpec(f"--store {spec.url!r}: expected sqlite:PATH, etcd://HOST:PORT,... or "
                      "etcds://HOST:PORT,...")
