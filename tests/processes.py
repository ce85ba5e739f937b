"""What the process tests read from /proc: a process's children, and whether a process still runs."""

from __future__ import annotations

from pathlib import Path


def children_of(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid` (ended ones waiting for their parent's wait too), with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue  # it ended while we looked
            if parent == pid:
                found[int(entry.name)] = command
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie has ended, only its parent's wait is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
