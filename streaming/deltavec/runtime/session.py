"""SparkSession with Delta Lake, for the embedded default and for real clusters.

The Delta JARs are named as Maven coordinates (``spark.jars.packages``); Spark's Ivy
resolves them from ``~/.m2/repository`` first and Maven Central second, and ships
them to executors itself. ``make jars`` warms ``~/.m2`` once so later starts work
offline. An image that already put the JARs into Spark's own ``jars/`` folder (the
deltavec image does, at build time) skips Ivy altogether: every node of the image
has them on its classpath, and nothing is fetched at run time.

On a cluster master, the driver also ships its own copy of the ``deltavec``
package to the executors (see ``shipping``), so driver and workers run the same code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from deltavec.runtime.class_archive import driver_java_options
from deltavec.sink.key_filter import IN_LIST_VALUES, PARQUET_IN_THRESHOLD

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SCALA_BINARY = "2.13"
_DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"


def delta_packages() -> list[str]:
    """Maven coordinates of the Delta JARs that match the installed delta-spark."""
    return [f"io.delta:delta-spark_{SCALA_BINARY}:{version('delta-spark')}"]


_RUNTIME_DEFAULTS = {
    # Each Arrow batch is one encoder call, sorted by token length inside: 2,048
    # rows leave 1% padding on mixed texts (1,024: 2%; 10,000: 0.5%) and keep a
    # worker's memory small; the token budget decides the forward-pass size.
    # Measured in conf/TUNING.md; conf/spark-gpu.conf raises it for GPUs.
    "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
    # Spark hands an IN list of at most this many values to the Parquet reader
    # (which then skips row groups holding none of them) and turns a longer one into
    # a single min-max range. The sink lists a micro-batch's keys in lists of this
    # size (deltavec/sink/merge.py); Spark's default of 10 would make them ranges.
    PARQUET_IN_THRESHOLD: str(IN_LIST_VALUES),
}


def spark_home() -> Path:
    """``$SPARK_HOME``, or the pyspark package folder that pip installs Spark into."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def delta_on_classpath(home: Path | None = None) -> bool:
    """Whether Spark's ``jars/`` folder already holds the matching delta-spark JAR."""
    jar = f"delta-spark_{SCALA_BINARY}-{version('delta-spark')}.jar"
    return ((home or spark_home()) / "jars" / jar).is_file()


def _local_defaults(master: str) -> dict[str, str]:
    cores = _local_cores(master)
    return {
        # Few, busy partitions: a micro-batch is small next to the shuffle default of 200.
        "spark.sql.shuffle.partitions": str(max(2, cores)),
        "spark.default.parallelism": str(max(2, cores)),
        # The Delta log replay uses its own partition count (50 by default), which
        # only costs task overhead on one machine.
        "spark.databricks.delta.snapshotPartitions": str(max(2, cores)),
    }


def _local_cores(master: str) -> int:
    inside = master[master.find("[") + 1 : master.find("]")] if "[" in master else "1"
    if inside.split(",")[0].strip() in ("*", ""):
        return os.cpu_count() or 1
    try:
        return int(inside.split(",")[0])
    except ValueError:
        return os.cpu_count() or 1


def _in_process(master: str) -> bool:
    """Whether tasks run inside the driver's JVM (``local``, ``local[N]``), not on executors.

    ``local-cluster[...]`` starts real executor processes, so it counts as a cluster.
    """
    return master == "local" or master.startswith("local[")


def _launches_jvm() -> bool:
    """Whether creating a session here starts a driver JVM whose options are ours to add
    to: not under spark-submit (the JVM runs already), not when a Spark defaults file
    sets the driver's options (ours would replace them)."""
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        return False
    conf_dir = Path(os.environ.get("SPARK_CONF_DIR") or spark_home() / "conf")
    defaults = conf_dir / "spark-defaults.conf"
    return not (defaults.is_file() and _DRIVER_JAVA_OPTIONS in defaults.read_text())


def build_session(
    *,
    master: str | None,
    app_name: str,
    conf: Mapping[str, str] | None = None,
    ship_package: bool = True,
    class_archive: bool = True,
) -> SparkSession:
    """Create (or join) the SparkSession the job runs in.

    Args:
        master: ``local[*]``, ``spark://host:7077``, ``k8s://…``; None keeps whatever
            spark-submit or the platform (Databricks) already set.
        app_name: the application name shown in the Spark UI.
        conf: extra Spark settings; they win over deltavec's defaults.
        ship_package: on a cluster master, send this process's ``deltavec``
            package to the executors (a session that already exists is left as is).
        class_archive: start a driver JVM that this process launches from the
            classes an earlier run loaded (``deltavec.runtime.class_archive``).
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        # Databricks notebooks and tests already hold a session with Delta in it.
        return active

    settings: dict[str, str] = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        # Spark's stage bars would draw over deltavec's own progress bar and fill
        # log files with carriage returns; the per-batch log line says more.
        "spark.ui.showConsoleProgress": "false",
    }
    if master and master.startswith("local"):
        settings.update(_local_defaults(master))
        # Python workers must run the interpreter that has torch and this package.
        # PySpark reads the variable when it creates the SparkContext; the
        # spark.pyspark.python setting only reaches drivers started by spark-submit.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    user_conf = dict(conf or {})
    packages = [p for p in user_conf.pop("spark.jars.packages", "").split(",") if p]
    has_delta = any(p.startswith("io.delta:delta-spark") for p in packages)
    if not has_delta and not delta_on_classpath():
        packages = delta_packages() + packages
    if packages:
        settings["spark.jars.packages"] = ",".join(packages)
    settings.update(user_conf)
    if class_archive and _launches_jvm():
        options = driver_java_options(spark_home(), settings.get("spark.jars.packages", ""))
        if options:
            own = settings.get(_DRIVER_JAVA_OPTIONS, "")
            settings[_DRIVER_JAVA_OPTIONS] = f"{own} {options}".strip()

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DELTAVEC_SPARK_LOG_LEVEL", "WARN"))
    # Runtime defaults yield to what the launcher set (spark-submit --conf or
    # --properties-file, spark-defaults.conf) as well as to the config's own.
    launched = spark.sparkContext.getConf()
    for key, value in _RUNTIME_DEFAULTS.items():
        if key not in user_conf and not launched.contains(key):
            spark.conf.set(key, value)
    if ship_package and not _in_process(spark.sparkContext.master or "local"):
        from deltavec.runtime.shipping import ship_package as ship

        ship(spark)
    return spark
