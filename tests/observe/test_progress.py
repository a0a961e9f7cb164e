"""Progress of long work: a bar on a terminal, structured log lines elsewhere."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

import pytest

from deltavec.observe.logs import kv
from deltavec.observe.progress import Progress
from tests.terminal import open_terminal, read_terminal


def test_on_a_terminal_a_bar_shows_done_of_total_and_log_lines_print_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master, slave = open_terminal()
    with os.fdopen(slave, "w", buffering=1) as terminal:
        # As in the CLI: the log handler and the bar share standard error, a terminal.
        monkeypatch.setattr(sys, "stderr", terminal)
        handler = logging.StreamHandler(sys.stderr)
        logging.getLogger().addHandler(handler)
        try:
            with Progress(1000, task="reembed") as progress:
                progress.advance(250)
                logging.getLogger("deltavec.test").warning("a line in the middle")
                progress.advance(750)
        finally:
            logging.getLogger().removeHandler(handler)
        screen = read_terminal(master, timeout=10, done=lambda: True)
    os.close(master)
    assert "reembed" in screen
    assert re.search(r"reembed: 100%.*1000/1000 rows \[.*rows/s\]", screen), screen
    assert "a line in the middle" in screen
    # The log line is written on a line of its own, not glued to a bar.
    assert any(line.strip() == "a line in the middle" for line in screen.splitlines())


def test_elsewhere_progress_is_logged_as_structured_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()  # not a terminal
    caplog.set_level(logging.INFO, logger="deltavec.observe.progress")
    with Progress(200, task="embed", stream=stream, log_every=0) as progress:
        progress.advance(50)
        progress.advance(150)
    lines = [r.getMessage() for r in caplog.records if r.name == "deltavec.observe.progress"]

    assert stream.getvalue() == ""  # no bar, no carriage returns
    assert lines[0].startswith("event=progress task=embed done=50 total=200 unit=rows ")
    assert "percent=25.000" in lines[0]
    assert re.search(r"eta_s=\d+\.\d{3}", lines[0])
    assert "done=200 total=200" in lines[-1] and "percent=100.000" in lines[-1]


def test_log_lines_are_throttled_but_the_last_one_is_always_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="deltavec.observe.progress")
    with Progress(None, task="embed", stream=io.StringIO(), log_every=3600) as progress:
        for _ in range(100):
            progress.advance(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "deltavec.observe.progress"]
    assert len(lines) == 2  # the first advance, and the close
    assert "done=100 total= " in lines[-1]  # an unknown total stays unknown


def test_a_low_estimate_grows_to_what_was_done(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deltavec.observe.progress")
    with Progress(10, task="embed", stream=io.StringIO(), log_every=0) as progress:
        progress.advance(15)
    assert progress.total == 15
    assert "done=15 total=15" in caplog.records[-1].getMessage()


def test_structured_values_are_quoted_when_they_would_break_the_line() -> None:
    line = kv("batch", batch_id=3, model="a b", seconds=1.23456, version=None, ok=True)
    assert line == 'event=batch batch_id=3 model="a b" seconds=1.235 version= ok=true'
