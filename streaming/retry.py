"""Which Delta write failures are retried, and how.

A concurrent OPTIMIZE, VACUUM or another writer can make Delta's optimistic commit
fail with a conflict. Retrying is safe because every deltavec write is
idempotent: it carries (app id, batch id), so a retry of a commit that did land
is skipped by Delta.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bounded: a conflict that outlasts about a minute is not contention but a bug or
# a competing job, and should fail the batch loudly.
MAX_ATTEMPTS = 8
BASE_DELAY_S = 0.5
MAX_DELAY_S = 15.0

_CONFLICT_NAMES = (
    "ConcurrentAppendException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "ConcurrentWriteException",
    "MetadataChangedException",
    "ProtocolChangedException",
    "DeltaConcurrentModificationException",
)

_retries_listeners: list[Callable[[str], None]] = []


def on_retry(listener: Callable[[str], None]) -> Callable[[], None]:
    """Register a callback told the conflict's name at every retry (for metrics).

    Returns:
        A function that unregisters it (a job's metrics stop with the job).
    """
    _retries_listeners.append(listener)

    def unregister() -> None:
        if listener in _retries_listeners:
            _retries_listeners.remove(listener)

    return unregister


def conflict_name(exc: BaseException) -> str | None:
    """The Delta conflict an exception stands for, or None if it is something else."""
    try:
        from delta.exceptions import DeltaConcurrentModificationException

        if isinstance(exc, DeltaConcurrentModificationException):
            return type(exc).__name__
    except ImportError:
        pass
    text = f"{type(exc).__name__}: {exc}"
    return next((name for name in _CONFLICT_NAMES if name in text), None)


def retry_conflicts(
    action: Callable[[], T],
    *,
    what: str,
    attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action``, retrying Delta commit conflicts with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            name = conflict_name(exc)
            if name is None or attempt == attempts:
                raise
            delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s hit %s (attempt %d of %d); retrying in %.1fs",
                what,
                name,
                attempt,
                attempts,
                delay,
            )
            for listener in _retries_listeners:
                listener(name)
            sleep(delay)
    raise AssertionError("unreachable")
