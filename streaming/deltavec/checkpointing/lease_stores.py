"""Where a checkpoint's lease files live: the few file operations a lease needs.

Local folders use the operating system directly (``O_EXCL``); every other URI goes
through Hadoop's FileSystem on the driver, so a checkpoint on HDFS, S3, ABFS, GCS
or DBFS is leased the same way.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

LEASE_DIR = "_deltavec/lease"


class LeaseStore(Protocol):
    """The few file operations a lease needs, on one folder."""

    def names(self) -> list[str]: ...
    def read(self, name: str) -> str | None: ...
    def create_exclusive(self, name: str, text: str) -> bool: ...
    def overwrite(self, name: str, text: str) -> None: ...
    def delete(self, name: str) -> None: ...


class LocalStore:
    """A lease folder on the local file system, with ``O_EXCL`` for the exclusive create."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder.removeprefix("file://").removeprefix("file:"))

    def names(self) -> list[str]:
        try:
            return [p.name for p in self.folder.iterdir() if p.suffix == ".json"]
        except FileNotFoundError:
            return []

    def read(self, name: str) -> str | None:
        try:
            return (self.folder / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def create_exclusive(self, name: str, text: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return True

    def overwrite(self, name: str, text: str) -> None:
        # Write then rename, so a reader never sees half a heartbeat.
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.folder / name)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()


class HadoopStore:
    """A lease folder on any Hadoop file system (HDFS, S3A, ABFS, GCS, DBFS)."""

    def __init__(self, spark: SparkSession, folder: str) -> None:
        from deltavec.runtime.tables import hadoop_fs

        self.folder = folder.rstrip("/")
        self._fs, self._dir = hadoop_fs(spark, self.folder)
        jvm: Any = spark.sparkContext._jvm
        self._jvm = jvm

    def _path(self, name: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(f"{self.folder}/{name}")

    def names(self) -> list[str]:
        if not self._fs.exists(self._dir):
            return []
        names = (str(s.getPath().getName()) for s in self._fs.listStatus(self._dir))
        return [n for n in names if n.endswith(".json")]

    def read(self, name: str) -> str | None:
        path = self._path(name)
        try:
            stream = self._fs.open(path)
        except Exception:  # noqa: BLE001 - FileNotFoundException arrives as a Py4J error
            return None
        try:
            return str(self._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
        finally:
            stream.close()

    def create_exclusive(self, name: str, text: str) -> bool:
        try:
            stream = self._fs.create(self._path(name), False)
        except Exception as exc:
            if "AlreadyExists" in str(exc) or "already exists" in str(exc):
                return False
            raise
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        return True

    def overwrite(self, name: str, text: str) -> None:
        stream = self._fs.create(self._path(name), True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()

    def delete(self, name: str) -> None:
        self._fs.delete(self._path(name), False)


def store_for(location: str, spark: SparkSession | None = None) -> LeaseStore:
    """The lease folder of a checkpoint: local files directly, anything else through Hadoop."""
    folder = f"{location.rstrip('/')}/{LEASE_DIR}"
    if location.startswith("/") or location.startswith("file:"):
        return LocalStore(folder)
    if spark is None:
        raise ValueError(f"a SparkSession is needed to lease {location}")
    return HadoopStore(spark, folder)


__all__ = ["LEASE_DIR", "HadoopStore", "LeaseStore", "LocalStore", "store_for"]
