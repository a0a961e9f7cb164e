"""Delta transaction ids, the session settings that carry them, and conflict retries.

Every deltavec write to a target or quarantine table carries (app id, batch id):
Delta records the pair in the commit and skips a later write with the same app id
and a batch id it has already committed. That one rule makes a replayed
micro-batch write nothing twice, and makes retrying safe.

A concurrent OPTIMIZE, VACUUM or another writer can make Delta's optimistic commit
fail with a conflict; ``retry_conflicts`` decides in one place which failures are
retried, and how.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

T = TypeVar("T")

# Delta's session settings for an idempotent write (MERGE, UPDATE, DELETE); a
# DataFrame append takes the same pair as the options txnAppId/txnVersion.
TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
TXN_VERSION = "spark.databricks.delta.write.txnVersion"
# The append's own app id: Delta keeps one increasing version per app id, and the
# MERGE of the same batch already records (app id, batch id).
APPEND_SUFFIX = "-append"

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


def txn_settings(app_id: str, batch_id: int) -> dict[str, str]:
    """The session settings that make one write idempotent under (app id, batch id)."""
    return {TXN_APP_ID: app_id, TXN_VERSION: str(batch_id)}


@contextmanager
def session_settings(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Set Spark session settings for the duration of a block, then restore them."""
    previous: dict[str, str | None] = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def transaction(spark: SparkSession, app_id: str, batch_id: int) -> AbstractContextManager[None]:
    """A block whose Delta writes carry (app id, batch id); a replay of it is skipped."""
    return session_settings(spark, txn_settings(app_id, batch_id))
