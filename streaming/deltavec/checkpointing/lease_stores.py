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
        # Written whole elsewhere, then linked into place: link() fails if the name
        # exists, and a reader never sees the file empty or half-written.
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, self.folder / name)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
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
        self._gateway: Any = spark.sparkContext._gateway

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

    def _write_temporary(self, name: str, text: str) -> Any:
        tmp = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
        stream = self._fs.create(tmp, False)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        return tmp

    def create_exclusive(self, name: str, text: str) -> bool:
        # Written whole elsewhere, then renamed into place: FileSystem.rename never
        # replaces an existing file (it returns false), so exactly one of two racing
        # jobs wins, and a reader never sees a half-written lease. Atomic where the
        # store's rename is (HDFS, ABFS with hierarchical namespace, local); S3A's
        # rename is a copy, checked and done in two steps.
        tmp = self._write_temporary(name, text)
        try:
            return bool(self._fs.rename(tmp, self._path(name)))
        finally:
            if self._fs.exists(tmp):
                self._fs.delete(tmp, False)

    def overwrite(self, name: str, text: str) -> None:
        # Written whole elsewhere, then renamed over the old file (FileContext's
        # rename with OVERWRITE), so a heartbeat never shows a zero-length lease.
        tmp = self._write_temporary(name, text)
        hadoop = self._jvm.org.apache.hadoop
        context = hadoop.fs.FileContext.getFileContext(self._dir.toUri(), self._fs.getConf())
        gateway: Any = self._gateway
        rename_options = gateway.new_array(hadoop.fs.Options.Rename, 1)
        rename_options[0] = hadoop.fs.Options.Rename.OVERWRITE
        try:
            context.rename(tmp, self._path(name), rename_options)
        finally:
            if self._fs.exists(tmp):
                self._fs.delete(tmp, False)

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
