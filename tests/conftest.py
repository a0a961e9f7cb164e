"""Shared fixtures: one real local Spark with Delta, real tables in tmp_path, the real model."""

from __future__ import annotations

import csv
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
STS_REFERENCE_SPEARMAN = 0.8672

SOURCE_ROOT = REPO / "streaming"
# This process and every process it starts (Spark's Python workers, the job as a
# subprocess) import this checkout's package, not another copy on the path,
# whatever folder they start in; the repository root is there for ``benchmarks``.
sys.path.insert(0, str(SOURCE_ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(SOURCE_ROOT), str(REPO), os.environ.get("PYTHONPATH", "")) if p
)
# A Hugging Face cache the tests lay out themselves, the Hub never asked: set before
# Spark starts, so its Python workers resolve Hub ids from the same folder.
HF_HOME = REPO / ".pytest_cache" / "hf-home"
os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
# The jobs tests start as subprocesses live from seconds to a minute, mostly starting
# up, and on two cores the JVM's optimizing (C2) compiler costs more CPU than it
# saves there: a 10-row first run took 41 s instead of 55 with these options. The
# test session's own long-lived JVM keeps the defaults (it was 12% slower with
# them); see the ``spark`` fixture. Nothing here changes what a job computes.
SHORT_LIVED_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
os.environ.setdefault("JDK_JAVA_OPTIONS", SHORT_LIVED_JVM)
# Those jobs start from the classes the first of them loaded (deltavec.runtime.class_archive),
# kept with the suite's other caches rather than in the user's.
os.environ.setdefault("DELTAVEC_CLASS_ARCHIVE_DIR", str(REPO / ".pytest_cache" / "jvm-classes"))


def shared_data_dir() -> Path:
    """../shared/data next to the checkout (or $DELTAVEC_SHARED_DATA)."""
    override = os.environ.get("DELTAVEC_SHARED_DATA")
    candidates = [Path(override)] if override else []
    candidates += [parent / "shared" / "data" for parent in REPO.parents]
    for candidate in candidates:
        if (candidate / "stsbenchmark" / "sts-dev.csv").exists():
            return candidate
    raise FileNotFoundError(
        "the STS benchmark data was not found in ../shared/data; set DELTAVEC_SHARED_DATA"
    )


def load_sts_pairs() -> list[tuple[float, str, str]]:
    """(gold score, sentence1, sentence2) for the 1,500 STS-B dev pairs."""
    path = shared_data_dir() / "stsbenchmark" / "sts-dev.csv"
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            pairs.append((float(row[4]), row[5], row[6]))
    return pairs


@pytest.fixture(scope="session")
def sts_pairs() -> list[tuple[float, str, str]]:
    return load_sts_pairs()


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from deltavec.runtime.session import build_session

    warehouse = REPO / ".pytest_cache" / "spark-warehouse"
    # The JVM starts here and inherits this environment: not the short-lived options.
    java_options = os.environ.pop("JDK_JAVA_OPTIONS", None)
    try:
        session = build_session(
            master="local[2]",
            app_name="deltavec-tests",
            conf={
                "spark.ui.enabled": "false",
                "spark.sql.shuffle.partitions": "2",
                "spark.default.parallelism": "2",
                "spark.databricks.delta.snapshotPartitions": "2",
                "spark.sql.warehouse.dir": str(warehouse),
                "spark.driver.memory": "2g",
            },
            # This JVM lives as long as the suite: claiming the archive's writing, it
            # would leave none for the jobs the tests start as processes.
            class_archive=False,
        )
    finally:
        if java_options is not None:
            os.environ["JDK_JAVA_OPTIONS"] = java_options
    yield session
    session.stop()


def write_config(tmp_path: Path, body: str = "", **sections: dict[str, Any]) -> Path:
    """A TOML config under tmp_path: tables and checkpoint in tmp_path, test Spark settings."""
    base = {
        "source": {
            "path": str(tmp_path / "source"),
            "key": ["id"],
            "template": "{title} [SEP] {abstract}",
        },
        "target": {"path": str(tmp_path / "target")},
        "checkpoint": {"location": str(tmp_path / "checkpoint")},
        "spark": {"master": "local[2]"},
        "metrics": {"port": 0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path = tmp_path / "deltavec.toml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(body), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_rows(
    spark: Any,
    path: Path | str,
    rows: list[dict[str, Any]],
    *,
    schema: str = "id long, title string, abstract string",
    mode: str = "append",
    cdf: bool = True,
) -> None:
    """Append (or overwrite) rows to a Delta table, creating it with CDF on."""
    frame = spark.createDataFrame(rows, schema)
    writer = frame.write.format("delta").mode(mode)
    if cdf:
        writer = writer.option("delta.enableChangeDataFeed", "true")
    writer.save(str(path))


def read_target(spark: Any, path: Path | str) -> list[Any]:
    return spark.read.format("delta").load(str(path)).collect()


@pytest.fixture(scope="session")
def model_path() -> str:
    from deltavec.embed.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def encoder(model_path: str) -> Any:
    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.udf import get_encoder

    return get_encoder(EncoderSpec(model=model_path, device="cpu"))


@pytest.fixture(scope="session")
def st_model(model_path: str) -> Any:
    """sentence-transformers itself: the reference every vector is checked against."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device="cpu")


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> list[Any]:
    """Tiny random-weight sentence-transformers models, one per supported case."""
    from tests.embed.model_zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("model-zoo"), model_path, HF_HOME)
