"""What deltavec reads from, and keeps in, a Structured Streaming checkpoint.

Files are read through Hadoop's FileSystem on the driver, so a checkpoint on
S3, ABFS, GCS, HDFS or DBFS works the same as a local folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavec.runtime.tables import hadoop_fs, read_text

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_APP_ID_PREFIX = "deltavec-"
LAST_BATCH_NOTE = "_deltavec/last_batch.json"


@dataclass(frozen=True)
class DeltaOffset:
    """The Delta source's position after a micro-batch (from ``offsets/<batchId>``)."""

    reservoir_id: str
    reservoir_version: int
    index: int
    # True while the stream still reads the table's starting snapshot, which already
    # holds the effect of every commit up to ``reservoir_version``.
    is_starting_version: bool = False

    @property
    def last_version(self) -> int:
        """The newest source commit whose rows this offset includes.

        An index of -1 means "every file of the previous version is done": the
        offset stands at the start of ``reservoir_version``.
        """
        return self.reservoir_version - 1 if self.index == -1 else self.reservoir_version

    @property
    def processed_through(self) -> int:
        """The newest source version all of whose rows are done; -1 when none is yet.

        An index of -1 stands before ``reservoir_version``. Any other index is a
        version cut short by ``maxFilesPerTrigger``: the versions before it are done.
        Inside the initial snapshot (``isStartingVersion``), the files still to read
        may come from any earlier version, so no version is done yet.
        """
        if self.index == -1:
            return self.reservoir_version - 1
        return -1 if self.is_starting_version else self.reservoir_version - 1

    @property
    def covered_through(self) -> int:
        """The newest source commit a stream at this offset has moved past (read or skipped)."""
        return self.reservoir_version if self.is_starting_version else self.last_version


class Checkpoint:
    """A checkpoint folder: Spark's own files plus deltavec's ``_deltavec/`` notes."""

    def __init__(self, spark: SparkSession, location: str) -> None:
        self.spark = spark
        self.location = location.rstrip("/")
        self._fs, _ = hadoop_fs(spark, self.location)
        jvm: Any = spark.sparkContext._jvm
        self._Path = jvm.org.apache.hadoop.fs.Path

    def _read(self, relative: str) -> str | None:
        return read_text(self.spark, f"{self.location}/{relative}")

    def write_text(self, relative: str, text: str) -> None:
        stream = self._fs.create(self._Path(f"{self.location}/{relative}"), True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()

    def exists(self) -> bool:
        return bool(self._fs.exists(self._Path(f"{self.location}/metadata")))

    def query_id(self) -> str | None:
        """The stream's id, fixed when the checkpoint was created."""
        text = self._read("metadata")
        return str(json.loads(text)["id"]) if text else None

    def app_id(self) -> str:
        """Delta ``txnAppId`` for this checkpoint: a new checkpoint gets a new one.

        Raises:
            RuntimeError: the stream has not created the checkpoint yet.
        """
        query_id = self.query_id()
        if query_id is None:
            raise RuntimeError(f"checkpoint {self.location} has no metadata yet")
        return _APP_ID_PREFIX + query_id

    def offset(self, batch_id: int) -> DeltaOffset | None:
        """The Delta source offset recorded for ``batch_id`` (written before the batch runs)."""
        text = self._read(f"offsets/{batch_id}")
        return parse_delta_offset(text) if text else None

    def last_committed_batch(self) -> int | None:
        """The newest batch id Spark marked done in ``commits/``."""
        return self._newest("commits")

    def last_planned_batch(self) -> int | None:
        """The newest batch id Spark wrote an offset for (it may not have run yet)."""
        return self._newest("offsets")

    def _newest(self, folder: str) -> int | None:
        path = self._Path(f"{self.location}/{folder}")
        if not self._fs.exists(path):
            return None
        ids = [
            int(status.getPath().getName())
            for status in self._fs.listStatus(path)
            if status.getPath().getName().isdigit()
        ]
        return max(ids) if ids else None

    def notes(self) -> dict[str, Any]:
        """deltavec's own record in the checkpoint (source table id, model)."""
        text = self._read("_deltavec/job.json")
        try:
            return dict(json.loads(text)) if text else {}
        except ValueError:
            # A process killed while writing them leaves them cut short; the job
            # writes them again after its checks.
            log.warning("checkpoint %s: unreadable _deltavec/job.json, ignored", self.location)
            return {}

    def write_notes(self, notes: dict[str, Any]) -> None:
        self.write_text("_deltavec/job.json", json.dumps(notes, indent=2, sort_keys=True))

    def processed_offset(self) -> tuple[int, DeltaOffset] | None:
        """(batch id, source offset) of the newest batch Spark committed, if any."""
        batch_id = self.last_committed_batch()
        if batch_id is None:
            return None
        offset = self.offset(batch_id)
        return (batch_id, offset) if offset else None

    def last_batch(self) -> dict[str, Any]:
        """What the newest written micro-batch did and when (see ``record_batch``)."""
        text = self._read(LAST_BATCH_NOTE)
        return dict(json.loads(text)) if text else {}

    def record_batch(self, record: dict[str, Any]) -> None:
        """Keep the newest micro-batch's numbers, so ``deltavec status`` can show them."""
        self.write_text(LAST_BATCH_NOTE, json.dumps(record, sort_keys=True))


def parse_delta_offset(text: str) -> DeltaOffset | None:
    """Parse an ``offsets/<n>`` file: a version line, a metadata line, one line per source."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines[2:]):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "reservoirVersion" in data:
            return delta_offset(data)
    return None


def delta_offset(data: dict[str, Any]) -> DeltaOffset:
    """A Delta source offset from its JSON form (an offsets file line or a progress event)."""
    return DeltaOffset(
        reservoir_id=str(data.get("reservoirId", "")),
        reservoir_version=int(data["reservoirVersion"]),
        index=int(data.get("index", -1)),
        is_starting_version=bool(data.get("isStartingVersion", False)),
    )
