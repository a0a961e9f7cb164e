"""Progress of long work (draining a backlog, re-embedding a table) for the person waiting.

On a terminal: a tqdm bar with rows done of rows to do, rows/s and the time
left, while log lines keep printing above it. Anywhere else (a log file, a
cluster's driver log): a structured ``event=progress`` line at most every
``log_every`` seconds and at the end, since a redrawn bar would fill a file with
carriage returns.

Usage, for any loop that knows how much it has done::

    with Progress(total_rows, task="reembed") as progress:
        for chunk in chunks:
            ...
            progress.advance(len(chunk))
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from deltavec.observe.logs import kv

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Units done of units to do, shown as a bar on a terminal and as log lines elsewhere.

    Args:
        total: units to do; None when unknown (then no percentage or ETA). An
            estimate may be low: the total grows to what was done.
        task: what is being done, e.g. "embed" or "reembed".
        unit: what is counted.
        stream: where the bar goes (default: standard error).
        interactive: draw a bar; default: whether ``stream`` is a terminal.
        log_every: seconds between log lines when not drawing a bar.
    """

    def __init__(
        self,
        total: int | None,
        *,
        task: str,
        unit: str = "rows",
        stream: TextIO | None = None,
        interactive: bool | None = None,
        log_every: float = 10.0,
    ) -> None:
        self.total = total
        self.task = task
        self.unit = unit
        self.done = 0
        self.log_every = log_every
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._last_log = float("-inf")
        self._closed = False
        self._exit = contextlib.ExitStack()
        self._bar: tqdm[None] | None = None
        if interactive is None:
            interactive = _is_terminal(self._stream)
        if interactive:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # A terminal that reports no width (some pseudo-terminals) would get an
            # empty bar: give it a fixed one.
            sized = _has_width(self._stream)
            self._bar = tqdm(
                total=total,
                desc=task,
                unit=f" {unit}",
                file=self._stream,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 40,
                # Always units per second: a slow model shows "0.4 rows/s", not "2.5s/ rows".
                bar_format=(
                    "{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, "
                    "{rate_noinv_fmt}]"
                    if total is not None
                    else "{desc}: {n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}]"
                ),
                # The average since the start: micro-batches arrive in bursts, so
                # a moving rate would swing between zero and peaks.
                smoothing=0,
            )
            # Log lines print above the bar instead of through it.
            self._exit.enter_context(logging_redirect_tqdm())

    def update(self, done: int, total: int | None) -> None:
        """Set how much is done of how much in all (for work that reports totals)."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.advance(done - self.done)

    def advance(self, n: int) -> None:
        """Record ``n`` more units done."""
        if self._closed:
            return
        self.done += n
        if self.total is not None and self.done > self.total:
            self.total = self.done
            if self._bar is not None:
                self._bar.total = self.done
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_log >= self.log_every:
            self._log()

    def close(self) -> None:
        """Finish the bar, or log the final line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._log()
        self._exit.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = time.monotonic() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the average rate; None without a total or a rate."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def _log(self) -> None:
        self._last_log = time.monotonic()
        percent = 100.0 * self.done / self.total if self.total else None
        log.info(
            "%s",
            kv(
                "progress",
                task=self.task,
                done=self.done,
                total=self.total,
                unit=self.unit,
                percent=percent,
                per_s=self.rate,
                eta_s=self.eta_seconds,
            ),
        )


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_width(stream: TextIO) -> bool:
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):
        return False
