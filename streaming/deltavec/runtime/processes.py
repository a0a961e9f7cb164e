"""Whether a process on this machine still runs: for leases and claims that name their holder.

A pid alone can be reused once its process ended; the kernel's start time of the
process tells the holder from a newcomer with the same pid.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so count from its end.
    return stat[stat.rfind(")") + 2 :].split()[19]


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (and, given its ``started`` time, is still the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start(pid) in (None, started)
