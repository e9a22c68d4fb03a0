"""The one place that runs external commands.

Argument lists only (never a shell), LC_ALL=C so output parses the same everywhere,
a timeout on every call, and output kept in CommandFailed for the log.
"""

from __future__ import annotations

import logging
import os
import subprocess

from engine.errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}


def run(
    argv: list[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv and return the finished process; CommandFailed on failure or timeout."""
    log.debug("run %s", argv)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=_ENV,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(argv, -1, _text(e.stdout), f"timed out after {timeout_s}s") from None
    except FileNotFoundError:
        raise CommandFailed(argv, 127, "", f"{argv[0]}: command not found") from None
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw
