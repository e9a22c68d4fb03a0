"""Finding again a process started earlier, by whoever: by its pid and its command line."""

from __future__ import annotations


def alive(pid: int, marker: str) -> bool:
    """A live (not zombie) process pid whose command line contains marker: a pid from a
    pid file may have been reused by an unrelated process since."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and marker in cmdline
