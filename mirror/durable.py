"""Crash-safe small-file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
from typing import Any

from engine.fileops import fsync_dir


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, sort_keys=True).encode())


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())
