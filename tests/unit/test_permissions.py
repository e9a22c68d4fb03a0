"""Owner-only modes (engine/permissions.py), on a temporary directory."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from engine import permissions


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_made_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = Path(permissions.private_dir(str(tmp_path / "state")))
        f = Path(permissions.private_file(str(d / "state.sqlite")))
    finally:
        os.umask(old)
    assert (mode(d), mode(f)) == (0o700, 0o600)


def test_existing_file_is_tightened_with_a_warning_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "state.sqlite"
    f.write_bytes(b"records")
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        permissions.private_file(str(f))
    assert mode(f) == 0o600 and f.read_bytes() == b"records"  # never truncated
    assert f"{f} had mode 0644" in caplog.text and "tightened to 0600" in caplog.text


def test_tighten_only_removes_bits_and_is_quiet_when_nothing_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "ro"
    f.write_bytes(b"")
    f.chmod(0o400)
    with caplog.at_level(logging.WARNING):
        assert permissions.tighten(str(f), permissions.PRIVATE_FILE)
    assert mode(f) == 0o400 and caplog.text == ""
    assert not permissions.tighten(str(tmp_path / "absent"), permissions.PRIVATE_FILE)
