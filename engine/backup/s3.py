"""The S3 client: boto3, configured for S3-compatible stores, behind a few calls.

Why boto3: maintained by AWS, the widest tested S3 surface (multipart, ranged GETs,
batch deletes), retries with exponential backoff and jitter built in ("standard" mode),
and s3transfer's multipart uploads with a bounded part size and thread count. Settings
that matter for stores other than AWS:
- request/response checksums only when required: recent botocore otherwise sends
  CRC32 trailers that older S3-compatible servers (radosgw 16.2 among them) refuse;
- path-style addressing: no wildcard DNS needed for the bucket;
- a completed multipart upload's ETag is empty on radosgw 16.2, so a PUT is confirmed by
  HEAD (its length), never by the ETag;
- multipart only for large objects (MULTIPART_THRESHOLD below).
Errors become domain errors here (engine/errors.py), with messages that never carry
credentials; the SDK's own loggers are kept at WARNING (their DEBUG lines show request
headers).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from engine.backup.targets import ObjectStore
from engine.errors import NotFound, Precondition, Unavailable

MIB = 1024 * 1024
# Objects above this go in parts (PART_BYTES each, two at a time). Packs (about 17 MiB) go
# in one PUT: against radosgw here, multipart doubled the client's CPU per byte and halved
# the throughput (94 vs 200 MB/s with 17 MiB objects, three at a time).
MULTIPART_THRESHOLD = 64 * MIB
PART_BYTES = 16 * MIB
MAX_ATTEMPTS = 8  # per request, with exponential backoff (botocore "standard" mode)
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def quiet_sdk_logs() -> None:
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size_bytes: int
    modified_at: float


class Bucket:
    """One target's bucket. Thread-safe (boto3 clients are); counts the bytes it sent."""

    def __init__(self, store: ObjectStore, *, max_connections: int = 8,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_bytes: int = PART_BYTES):
        quiet_sdk_logs()
        t, c = store.target, store.credentials
        self.name = t.bucket
        self.where = f"{t.name} ({t.endpoint}, bucket {t.bucket})"
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            max_pool_connections=max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"})
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=t.endpoint, region_name=t.region,
            aws_access_key_id=c.access_key_id, aws_secret_access_key=c.secret_access_key,
            aws_session_token=c.session_token or None,
            verify=t.ca_bundle or None, config=config)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=part_bytes, max_concurrency=2,
                                       use_threads=True)
        self._sent_lock = threading.Lock()
        self.bytes_sent = 0  # object bytes PUT (not headers, not retries)

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING or (status == "404" and code != "NoSuchBucket"):
                raise NotFound(f"{what}: no such object in {self.where}") from None
            if code == "NoSuchBucket":
                raise Precondition(f"{what}: bucket {self.name} does not exist at "
                                   f"{self.where}") from None
            if code in _REFUSED or status == "403":
                raise Precondition(f"{what}: {self.where} refused the credentials "
                                   f"({code or status})") from None
            raise Unavailable(f"{what}: {self.where} answered {code or status}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise Unavailable(f"{what}: {self.where} cannot be reached "
                              f"({type(e).__name__})") from None

    def put(self, key: str, data: bytes) -> None:
        """Store data under key (in parts above the threshold), confirmed by a HEAD."""
        with self._translated(f"upload of {key}"):
            self.client.upload_fileobj(io.BytesIO(data), self.name, key, Config=self.transfer)
        info = self.head(key)
        if info is None or info.size_bytes != len(data):
            raise Unavailable(f"upload of {key} to {self.where} did not land whole")
        with self._sent_lock:
            self.bytes_sent += len(data)

    def get(self, key: str, start: int = 0, end: int = 0) -> bytes:
        """The object's bytes [start, end) (end 0: to its end)."""
        kwargs = {}
        if start or end:
            kwargs["Range"] = f"bytes={start}-{end - 1 if end else ''}"
        with self._translated(f"read of {key}"):
            body = self.client.get_object(Bucket=self.name, Key=key, **kwargs)["Body"]
            with contextlib.closing(body):
                data = body.read()
        if end and len(data) != end - start:
            raise NotFound(f"read of {key}: {self.where} holds fewer bytes than expected")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._translated(f"look-up of {key}"):
                rsp = self.client.head_object(Bucket=self.name, Key=key)
        except NotFound:
            return None
        return ObjectInfo(key, rsp["ContentLength"], rsp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._translated(f"listing of {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"], obj["Size"], obj["LastModified"].timestamp())

    def delete(self, keys: builtins.list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            with self._translated(f"deletion of {len(batch)} objects"):
                rsp = self.client.delete_objects(Bucket=self.name,
                                                 Delete={"Objects": batch, "Quiet": True})
            failed = [e for e in rsp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                raise Unavailable(f"{self.where} did not delete {failed[0].get('Key')}: "
                                  f"{failed[0].get('Code')}")
