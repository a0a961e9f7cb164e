"""A driver JVM that starts from the classes an earlier run loaded (HotSpot class data sharing).

A driver JVM loads and verifies the classes of Spark, Delta and Hadoop from their
JARs at every start: seconds of two cores' time before the first batch. JDK 13
and later can write the classes a JVM loaded to an archive when it exits
(``-XX:ArchiveClassesAtExit``) and map that archive at the next start
(``-XX:SharedArchiveFile``). Measured on a 2-core VM, a cold ``deltavec run
--once`` of 10 rows: 29.4 / 31.4 s without, 26.8 / 27.4 s with (conf/TUNING.md).

The archive belongs to one Java, one Spark and one set of Ivy packages, so its name
is a hash of those. One run at a time claims the right to write it; the JVM writes
it under a name of its own when it exits, and a later start adopts the file once it
is whole. HotSpot writes the archive's header last, so a file cut short (a JVM
killed while writing) has no magic number and is never adopted: a JVM that maps a
cut-short archive whose header is there dies of SIGBUS. A JVM that finds an
archive of another class path only ignores it, silently with the logging off.

Only a driver JVM that this process launches gets these options: one that
spark-submit or a platform started already has its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from importlib.metadata import version
from pathlib import Path

from deltavec.runtime.processes import process_alive, process_start

log = logging.getLogger(__name__)

ENV_DIR = "DELTAVEC_CLASS_ARCHIVE_DIR"
# HotSpot's magic number of a dynamic archive, little-endian, at offset 0.
_DYNAMIC_MAGIC = bytes.fromhex("a8ab0bf0")
_QUIET = "-Xlog:cds=off,cds+dynamic=off"
# A claim whose process is gone is free again after this long: its JVM had
# this long to write the archive after the process ended.
_CLAIM_GRACE_S = 60.0
_PART_MAX_AGE_S = 86_400.0


def archive_dir() -> Path:
    """``$DELTAVEC_CLASS_ARCHIVE_DIR``, else ``deltavec/jvm`` in the user's cache folder."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "deltavec" / "jvm"


def driver_java_options(spark_home: Path, packages: str, folder: Path | None = None) -> str:
    """JVM options that map this set-up's archive, or claim the writing of it.

    Empty when there is no Java to name the archive by, or when another run is
    writing it now.
    """
    folder = folder or archive_dir()
    try:
        key = _key(spark_home, packages)
        if key is None:
            return ""
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{key}.jsa"
        _adopt_finished(folder, key, final)
        if final.is_file():
            return f"{_option('-XX:SharedArchiveFile', final)} {_QUIET}"
        if _claim(folder / f"{key}.claim"):
            part = folder / f"{key}.{uuid.uuid4().hex}.part"
            log.info("the driver JVM will write its classes to %s when it exits", folder)
            return f"{_option('-XX:ArchiveClassesAtExit', part)} {_QUIET}"
    except OSError as exc:
        # A read-only or full cache only costs the faster start.
        log.debug("no JVM class archive in %s: %s", folder, exc)
    return ""


def _option(name: str, path: Path) -> str:
    # Spark's launcher splits the driver's options at spaces, except inside quotes.
    option = f"{name}={path}"
    return f'"{option}"' if any(c.isspace() for c in option) else option


def _key(spark_home: Path, packages: str) -> str | None:
    """A name for what the archive depends on: the Java binary, Spark's JARs, the packages."""
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home) / "bin" / "java" if java_home else shutil.which("java")
    if java is None or not Path(java).is_file():
        return None
    java = Path(java).resolve()
    # The JVM refuses an archive whose JARs changed since (it checks their times
    # and sizes): a reinstalled Spark gets an archive of its own.
    jars = sorted((spark_home / "jars").glob("*.jar"))
    listing = [f"{p.name} {p.stat().st_mtime_ns} {p.stat().st_size}" for p in jars]
    parts = [str(java), str(java.stat().st_mtime_ns), version("pyspark"), packages, *listing]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _adopt_finished(folder: Path, key: str, final: Path) -> None:
    """Move a whole archive a run wrote into place; drop a day-old part of any set-up
    (one never finished, or one of a Spark no run has started since)."""
    now = time.time()
    for part in folder.glob("*.part"):
        try:
            with part.open("rb") as f:
                whole = f.read(len(_DYNAMIC_MAGIC)) == _DYNAMIC_MAGIC
            if now - part.stat().st_mtime > _PART_MAX_AGE_S:
                part.unlink(missing_ok=True)
            elif not part.name.startswith(f"{key}."):
                continue
            elif whole:
                if final.exists():
                    part.unlink(missing_ok=True)
                else:
                    os.replace(part, final)
                # The run that claimed the writing has written.
                (folder / f"{key}.claim").unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # another start adopted or removed it


def _claim(path: Path) -> bool:
    """Take the right to write the archive: one run at a time, free again once that
    run is gone and its JVM had time to write."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {process_start(os.getpid()) or ''}")
        return True
    return False


def _stale(path: Path) -> bool:
    try:
        holder = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True
    if age <= _CLAIM_GRACE_S:
        return False  # a claim being written, or one whose JVM may still be writing
    pid, _, started = holder.partition(" ")
    try:
        return not process_alive(int(pid), started.strip() or None)
    except ValueError:
        return True
