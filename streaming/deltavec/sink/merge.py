"""Writing one micro-batch of changes into the target, at a cost set by the batch, not the table.

A MERGE whose condition only equates keys joins the batch with every file of the
target, and (without deletion vectors) rewrites every file holding a changed key.
These measures keep both in proportion to the batch (``benchmarks/merge_scaling.py``
measures them):

* **Key ranges in the condition.** The batch's keys, collapsed into at most
  ``max_key_ranges`` ranges, are added to the MERGE condition and to the lookup of
  existing rows as literal ``BETWEEN`` terms on the target's first key column.
  Delta prunes files by their min/max statistics on such terms, so only files that
  may hold a batch key are read. (Delta turns an ``IN`` list into one range from its
  smallest to its largest value, which for scattered keys prunes nothing.)
* **The keys themselves, down to the row group.** A batch of at most
  ``max_listed_keys`` distinct keys also puts them into both, as ``IN`` lists;
  Spark hands them to the Parquet reader, which skips every row group whose key
  statistics hold none of them. The target is created with row groups of about 100
  rows (``parquet.block.size``, a table property every Delta writer of the table
  applies), so a touched file costs reading the row groups of the changed keys,
  not the whole file: this matters most for Delta's deletion-vector MERGE, which
  reads every column of the touched rows' files, vectors included.
* **New keys are appended, not merged.** Keys the target does not hold yet are
  written by a blind append, sorted by key in files of at most
  ``max_rows_per_file`` rows; only keys that exist go through the MERGE, which then
  has no insert clause. Both commits carry (app id, batch id), so a replay writes
  neither twice.
* **Rewritten files keep their key range.** The MERGE broadcasts the (small) batch
  and, when the batch's keys fit the ranges exactly, reads each touched file in its
  own task, so each rewritten file holds the same keys as the file it replaces and
  the table stays clustered by key. (A shuffle join would scatter every rewritten
  row over the whole key range, and the next batch would have to touch those files
  again.) Keys scattered over the whole table touch most files whatever the
  layout; then files are packed into few tasks, and a periodic
  ``OPTIMIZE … ZORDER BY (key)`` restores the clustering.

With deletion vectors (``target.deletion_vectors``, on by default for a new
target) Delta marks a changed row deleted in its file and writes only the changed
rows, so a batch of scattered updates no longer rewrites most files; files are
then large (``Layout.rows_per_file``), since a batch opens every file holding one
of its keys but reads only the row groups near them. Without deletion vectors a
changed row costs rewriting the file that holds it, so files stay small, and the
last measure keeps them clustered. The search consumer (``deltavec.search``)
reads both.

This module imports no torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavec.columns import (
    BATCH_SOURCE_VERSION,
    BATCH_TEXT_HASH,
    DELETE,
    DIM,
    EMBEDDED_AT,
    EMBEDDING,
    MODEL,
    SOURCE_VERSION,
    TEXT_HASH,
    UPSERT,
)
from deltavec.config import TableRef
from deltavec.runtime import faults, tables
from deltavec.sink.key_filter import (
    COLLECTED_KEYS,
    IN_LIST_VALUES,
    LISTED_KEYS,
    PARQUET_IN_THRESHOLD,
    KeyFilter,
    frame_key_filter,
    listed_key_filter,
)
from deltavec.sink.transactions import (
    APPEND_SUFFIX,
    retry_conflicts,
    session_settings,
    txn_settings,
)

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

ACTION = "_action"
EXISTS = "_exists"
# The target holds the key more than once (see ``TargetWriter.existing``).
HELD_TWICE = "_held_twice"
TARGET_HASH = "_target_hash"
TARGET_MODEL = "_target_model"
TARGET_ROWS = "_target_rows"

# Above this many rows the batch is not broadcast to every task of the MERGE.
BROADCAST_ROWS = 50_000
# Spark packs small files into one read task until a task holds this many bytes;
# with the open cost as high, every file gets a task of its own (see the docstring).
_ONE_FILE_PER_TASK = "1g"


@dataclass(frozen=True)
class Layout:
    """How the target's files are laid out and rewritten.

    Attributes:
        max_rows_per_file: rows per file written by an append, or None for
            ``rows_per_file``'s default.
        max_key_ranges: ranges of batch keys put into the MERGE condition. Delta
            evaluates them over every file's statistics in one generated method;
            past about 100 ranges that method outgrows the JVM's 64 KB limit and
            Spark falls back to slow interpreted evaluation, with an error logged.
        max_listed_keys: a batch with at most this many distinct keys also lists
            them, for row-group skipping (see ``LISTED_KEYS``).
        max_collected_keys: a batch with at most this many distinct keys has its
            ranges cut on the driver, a larger one by Spark (see ``COLLECTED_KEYS``).
        deletion_vectors: the target marks changed rows deleted instead of
            rewriting files (its ``delta.enableDeletionVectors`` property).
    """

    max_rows_per_file: int | None = None
    max_key_ranges: int = 64
    max_listed_keys: int = LISTED_KEYS
    max_collected_keys: int = COLLECTED_KEYS
    deletion_vectors: bool = True

    @property
    def rows_per_file(self) -> int:
        """Rows per appended file: without deletion vectors a changed row costs
        rewriting its file, so files stay small; with them a batch costs opening
        every file holding one of its keys, so files are large and only their row
        groups near the keys are read."""
        if self.max_rows_per_file is not None:
            return self.max_rows_per_file
        return 50_000 if self.deletion_vectors else 2_000


@dataclass(frozen=True)
class WriteCounts:
    """Rows of one batch's changes for each write.

    Attributes:
        merge: rows for the MERGE (``_exists``), or an upper bound of them: the
            MERGE runs when it is above 0, and is broadcast when it is small.
        append: new keys' upserts, exactly: the append writes files by this count.
    """

    merge: int
    append: int


class TargetWriter:
    """Looks up and writes the target rows of one micro-batch.

    Args:
        target: the target table.
        keys: key columns; the first one carries the file pruning.
        model_identity: written into every row.
        dim: the vector size, written into every row.
        layout: file layout settings.
    """

    def __init__(
        self,
        *,
        target: TableRef,
        keys: list[str],
        model_identity: str,
        dim: int,
        layout: Layout | None = None,
    ) -> None:
        self.target = target
        self.keys = keys
        self.model_identity = model_identity
        self.dim = dim
        self.layout = layout or Layout()

    # -- reading ------------------------------------------------------------------------

    def key_filter(self, frame: DataFrame) -> KeyFilter | None:
        """The frame's first key column as a filter; None when it cannot be literals.

        Bounded on the driver whatever the batch holds (``frame_key_filter``).
        """
        return frame_key_filter(
            frame,
            self.keys[0],
            max_ranges=self.layout.max_key_ranges,
            max_listed=self.layout.max_listed_keys,
            max_collected=self.layout.max_collected_keys,
        )

    def listed_key_filter(self, values: Collection[Any]) -> KeyFilter | None:
        """The filter of a batch whose distinct first-key values are on the driver."""
        return listed_key_filter(values, max_ranges=self.layout.max_key_ranges)

    def existing(
        self, spark: SparkSession, frame: DataFrame, key_filter: KeyFilter | None
    ) -> DataFrame:
        """One row per target key of the frame, as of the target's newest version
        now: keys, ``_target_hash``, ``_target_model`` and ``_target_rows``.

        Only files (and row groups) whose key statistics can hold a key of
        ``key_filter`` are read. ``_target_rows`` above 1 is a key the target holds
        twice (written by something other than this job's lease holder): the sink
        repairs it rather than let the MERGE fail on it in every batch.
        """
        from pyspark.sql import functions as F

        # Read at the version the batch starts from, not "the latest": each write of
        # the batch makes Spark plan again every cached frame that reads the latest
        # target, and the frames built on this one (the model's output) would be
        # computed again against the target the batch has just written, running
        # the model a second time. A pinned version is another table to Spark's cache.
        version = tables.latest_version(spark, self.target)
        rows = tables.read(spark, self.target, versionAsOf=str(version))
        if key_filter is not None:
            rows = rows.where(key_filter.predicate(F.col(self.keys[0])))
        wanted = frame.select(*self.keys).distinct()
        return (
            rows.select(*self.keys, TEXT_HASH, MODEL)
            .join(wanted, on=self.keys, how="left_semi")
            .groupBy(*self.keys)
            .agg(
                F.max(TEXT_HASH).alias(TARGET_HASH),
                F.max(MODEL).alias(TARGET_MODEL),
                F.count(F.lit(1)).alias(TARGET_ROWS),
            )
        )

    # -- writing ------------------------------------------------------------------------

    def write(
        self,
        spark: SparkSession,
        changes: DataFrame,
        *,
        app_id: str,
        batch_id: int,
        key_filter: KeyFilter | None,
        counts: WriteCounts | None = None,
    ) -> dict[str, int]:
        """Apply one batch: MERGE updates and deletes of existing keys, append new keys.

        Args:
            changes: one row per key with ``_action`` ("upsert"/"delete"), ``_exists``
                (the target holds the key), and for upserts ``embedding``,
                ``_text_hash`` and ``_source_version``.
            app_id: the checkpoint's Delta txn app id.
            batch_id: the micro-batch id, the Delta txn version.
            key_filter: the batch's keys (``key_filter``), or None.
            counts: what the caller already knows of ``changes``; None counts them
                (one Spark job).

        Returns:
            Rows sent to the MERGE (at most, when ``counts`` gave a bound) and to the append.
        """
        from pyspark.sql import functions as F

        if counts is None:
            counts = self.count(changes)
        if counts.merge:
            self._merge(
                spark, changes.where(F.col(EXISTS)), counts.merge, app_id, batch_id, key_filter
            )
            faults.maybe_fail("between_writes")
        if counts.append:
            inserts = changes.where(~F.col(EXISTS) & (F.col(ACTION) == UPSERT))
            self._append(inserts, counts.append, app_id, batch_id)
        return {"merge": counts.merge, "append": counts.append}

    @staticmethod
    def count(changes: DataFrame) -> WriteCounts:
        """Rows of ``changes`` for the MERGE and for the append, in one Spark job."""
        from pyspark.sql import functions as F

        row = changes.agg(
            F.sum(F.when(F.col(EXISTS), 1).otherwise(0)).alias("merge"),
            F.sum(F.when(~F.col(EXISTS) & (F.col(ACTION) == UPSERT), 1).otherwise(0)).alias(
                "append"
            ),
        ).first()
        return WriteCounts(
            merge=int((row["merge"] if row else 0) or 0),
            append=int((row["append"] if row else 0) or 0),
        )

    def _values(self) -> dict[str, str | Column]:
        from pyspark.sql import functions as F

        return {
            EMBEDDING: F.col(f"s.`{EMBEDDING}`"),
            MODEL: F.lit(self.model_identity),
            DIM: F.lit(self.dim),
            TEXT_HASH: F.col(f"s.`{BATCH_TEXT_HASH}`"),
            SOURCE_VERSION: F.col(f"s.`{BATCH_SOURCE_VERSION}`"),
            EMBEDDED_AT: F.current_timestamp(),
        }

    def _merge(
        self,
        spark: SparkSession,
        rows: DataFrame,
        count: int,
        app_id: str,
        batch_id: int,
        key_filter: KeyFilter | None,
    ) -> None:
        from pyspark.sql import functions as F

        source = F.broadcast(rows) if count <= BROADCAST_ROWS else rows
        condition = F.lit(True)
        for key in self.keys:
            condition = condition & F.col(f"t.`{key}`").eqNullSafe(F.col(f"s.`{key}`"))
        if key_filter is not None:
            condition = condition & key_filter.predicate(F.col(f"t.`{self.keys[0]}`"))
        # Never let an older source version overwrite a newer one (a late retry).
        newer = (
            f"(t.`{SOURCE_VERSION}` IS NULL OR s.`{BATCH_SOURCE_VERSION}` IS NULL "
            f"OR t.`{SOURCE_VERSION}` <= s.`{BATCH_SOURCE_VERSION}`)"
        )
        settings = txn_settings(app_id, batch_id)
        if key_filter is not None and key_filter.values:
            # Also in a session deltavec did not build: the lists reach Parquet.
            threshold = int(spark.conf.get(PARQUET_IN_THRESHOLD, "10") or 10)
            settings[PARQUET_IN_THRESHOLD] = str(max(threshold, IN_LIST_VALUES))
        # Keeping each rewritten file's key range only pays while the ranges prune
        # precisely. Keys scattered over the whole table (more runs than ranges) touch
        # most files anyway, and one task per file would only add task overhead.
        precise = key_filter is not None and len(key_filter.ranges) < self.layout.max_key_ranges
        # With deletion vectors a MERGE rewrites no file, so there is no key range
        # to keep and one task per file would only add task overhead.
        if precise and not self.layout.deletion_vectors:
            settings["spark.sql.files.maxPartitionBytes"] = _ONE_FILE_PER_TASK
            settings["spark.sql.files.openCostInBytes"] = _ONE_FILE_PER_TASK

        def merge() -> None:
            with session_settings(spark, settings):
                (
                    tables.delta_table(spark, self.target)
                    .alias("t")
                    .merge(source.alias("s"), condition)
                    .whenMatchedDelete(condition=f"s.{ACTION} = '{DELETE}' AND {newer}")
                    .whenMatchedUpdate(
                        condition=f"s.{ACTION} = '{UPSERT}' AND {newer}", set=self._values()
                    )
                    .execute()
                )

        retry_conflicts(merge, what=f"MERGE of batch {batch_id} into {self.target.name}")

    def _append(self, rows: DataFrame, count: int, app_id: str, batch_id: int) -> None:
        from pyspark.sql import functions as F

        values = self._values()
        frame = rows.alias("s").select(
            *[F.col(f"s.`{k}`").alias(k) for k in self.keys],
            *[F.col(c).alias(n) if isinstance(c, str) else c.alias(n) for n, c in values.items()],
        )
        # Sorted by key, so each new file covers a narrow key range the pruning can use.
        if count <= self.layout.rows_per_file:
            frame = frame.coalesce(1).sortWithinPartitions(*self.keys)
        else:
            # A range partitioning costs a sampling pass; only worth it for large batches.
            files = math.ceil(count / self.layout.rows_per_file)
            frame = frame.repartitionByRange(files, *self.keys).sortWithinPartitions(*self.keys)
        writer = (
            frame.write.format("delta")
            .mode("append")
            .option("maxRecordsPerFile", str(self.layout.rows_per_file))
            # Per-write options rather than session settings: nothing else in the
            # session can pick them up.
            .option("txnAppId", app_id + APPEND_SUFFIX)
            .option("txnVersion", str(batch_id))
        )

        def append() -> None:
            if self.target.table:
                writer.saveAsTable(self.target.table)
            else:
                writer.save(self.target.path)

        retry_conflicts(append, what=f"append of batch {batch_id} to {self.target.name}")
