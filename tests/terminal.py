"""A pseudo-terminal for tests of what a person sees (test helper)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import termios
import time
from collections.abc import Callable

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def open_terminal(rows: int = 40, columns: int = 120) -> tuple[int, int]:
    """A pseudo-terminal (master, slave) with a window size, like a real one."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def read_terminal(master: int, *, timeout: float, done: Callable[[], bool]) -> str:
    """What was written to the terminal, until ``done()`` holds and nothing more arrives.

    Escape sequences are removed; carriage returns are kept.
    """
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data.decode("utf-8", errors="replace"))
        elif done():
            break
    return ANSI.sub("", "".join(chunks))
