"""Open Delta tables named by path or by catalog name, the same way everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltavec.config import TableRef

if TYPE_CHECKING:
    from delta.tables import DeltaTable
    from pyspark.sql import DataFrame, Row, SparkSession
    from pyspark.sql.streaming.readwriter import DataStreamReader


def exists(spark: SparkSession, ref: TableRef) -> bool:
    """Whether the table exists and is a Delta table."""
    from delta.tables import DeltaTable

    if ref.table:
        return bool(spark.catalog.tableExists(ref.table))
    return bool(DeltaTable.isDeltaTable(spark, _path(ref)))


def hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """(Hadoop FileSystem, Path) for ``path``: S3, ABFS, GCS, HDFS, DBFS or local alike."""
    jvm: Any = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hpath


def read_text(spark: SparkSession, path: str) -> str | None:
    """A small file's text, or None if it does not exist; any Hadoop file system."""
    fs, hpath = hadoop_fs(spark, path)
    if not fs.exists(hpath):
        return None
    stream = fs.open(hpath)
    try:
        jvm: Any = spark.sparkContext._jvm
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def path_has_files(spark: SparkSession, path: str) -> bool:
    """Whether anything is stored at ``path`` (a Delta table or not), on any file system."""
    fs, hpath = hadoop_fs(spark, path)
    return bool(fs.exists(hpath))


def delta_table(spark: SparkSession, ref: TableRef) -> DeltaTable:
    from delta.tables import DeltaTable

    if ref.table:
        return DeltaTable.forName(spark, ref.table)
    return DeltaTable.forPath(spark, _path(ref))


def _path(ref: TableRef) -> str:
    if not ref.path:
        raise ValueError("table reference has neither path nor table")
    return ref.path


def read(spark: SparkSession, ref: TableRef, **options: str) -> DataFrame:
    reader = spark.read.format("delta").options(**options)
    return reader.table(ref.table) if ref.table else reader.load(ref.path)


def read_stream(reader: DataStreamReader, ref: TableRef) -> DataFrame:
    return reader.table(ref.table) if ref.table else reader.load(ref.path)


def properties(spark: SparkSession, ref: TableRef) -> dict[str, str]:
    """The table's TBLPROPERTIES, read from the Delta log (no data scan)."""
    detail = delta_table(spark, ref).detail().select("properties").first()
    return dict(detail["properties"] or {}) if detail else {}


def detail(spark: SparkSession, ref: TableRef) -> dict[str, Any]:
    """``DESCRIBE DETAIL`` as a dict: id, numFiles, sizeInBytes, properties, …"""
    row = delta_table(spark, ref).detail().first()
    return row.asDict() if row else {}


def newest_commit(spark: SparkSession, ref: TableRef) -> Row | None:
    """The table's newest history row (``version``, ``timestamp``, …); None without commits."""
    # collect() of the history as it comes: a projection on it would cost a Spark job.
    rows = delta_table(spark, ref).history(1).collect()
    return rows[0] if rows else None


def latest_version(spark: SparkSession, ref: TableRef) -> int:
    row = newest_commit(spark, ref)
    return int(row["version"]) if row else -1
