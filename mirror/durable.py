"""Crash-safe small-file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
from typing import Any

from engine.fileops import fsync_dir, write_file_atomic

__all__ = ["fsync_dir", "read_json", "write_atomic", "write_json"]
write_atomic = write_file_atomic


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, sort_keys=True).encode())


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())
