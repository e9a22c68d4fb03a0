"""A throw-away certificate authority for tests (the `openssl` CLI, P-256 keys).

    ca = CertificateAuthority.create(tmp_dir)
    server = ca.issue("etcd-0", ip=["127.0.0.1"], dns=["localhost"])  # server and client use
    client = ca.issue("controller")
    grpc.ssl_channel_credentials(ca.cert_pem(), client.key_pem(), client.cert_pem())

Certificates are valid for both serverAuth and clientAuth, so one helper serves the
etcd members, the controller and the node agents' mutual TLS alike.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

DAYS = 2  # tests never outlive this


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "LC_ALL": "C"}, timeout=30)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class KeyPair:
    cert_file: str
    key_file: str

    def cert_pem(self) -> bytes:
        return _read(self.cert_file)

    def key_pem(self) -> bytes:
        return _read(self.key_file)


@dataclass(frozen=True)
class CertificateAuthority:
    directory: str
    cert_file: str
    key_file: str

    @classmethod
    def create(cls, directory: str, name: str = "Tandem test CA") -> CertificateAuthority:
        os.makedirs(directory, exist_ok=True)
        cert, key = os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", key, "-out", cert, "-days", str(DAYS), "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        return cls(directory, cert, key)

    def cert_pem(self) -> bytes:
        return _read(self.cert_file)

    def issue(self, name: str, *, ip: Sequence[str] = (), dns: Sequence[str] = ()) -> KeyPair:
        """A key and a certificate signed by this CA, CN=name, with the given SANs."""
        base = os.path.join(self.directory, name)
        key, csr, cert, ext = base + ".key", base + ".csr", base + ".crt", base + ".ext"
        sans = [f"IP:{a}" for a in ip] + [f"DNS:{d}" for d in dns]
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
            if sans:
                f.write(f"subjectAltName={','.join(sans)}\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=self.directory)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert_file, "-CAkey", self.key_file,
                 "-CAcreateserial", "-out", cert, "-days", str(DAYS), "-extfile", ext,
                 cwd=self.directory)
        os.chmod(key, 0o600)
        return KeyPair(cert, key)
