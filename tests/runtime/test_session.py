"""The SparkSession deltavec builds: where Delta comes from, and whose settings win."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from deltavec.runtime.session import delta_on_classpath, spark_home
from tests.conftest import REPO


def test_delta_is_taken_from_sparks_jars_folder_only_when_the_matching_jar_is_there(
    tmp_path: Path,
) -> None:
    jars = tmp_path / "jars"
    jars.mkdir()
    assert not delta_on_classpath(tmp_path)
    (jars / "delta-spark_2.13-0.0.1.jar").touch()  # another release is not enough
    assert not delta_on_classpath(tmp_path)
    (jars / f"delta-spark_2.13-{version('delta-spark')}.jar").touch()
    assert delta_on_classpath(tmp_path)


_PRINT_ARROW_BATCH = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, os.environ["DELTAVEC_REPO"])
    from deltavec.runtime.session import build_session
    spark = build_session(master=None, app_name="precedence", conf={"spark.ui.enabled": "false"})
    print("arrow=" + spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch"))
    spark.stop()
    """
)


@pytest.mark.slow
def test_spark_submit_settings_win_over_deltavecs_defaults(tmp_path: Path) -> None:
    """spark-gpu.conf's Arrow batch size, given with --properties-file, is the one used."""
    program = tmp_path / "program.py"
    program.write_text(_PRINT_ARROW_BATCH)

    def arrow_batch(*options: str) -> str:
        result = subprocess.run(
            [
                str(spark_home() / "bin" / "spark-submit"),
                "--master",
                "local[1]",
                *options,
                "--conf",
                f"spark.pyspark.python={sys.executable}",
                str(program),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "DELTAVEC_REPO": str(REPO)},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip().splitlines()[-1]

    assert arrow_batch("--properties-file", str(REPO / "conf" / "spark-gpu.conf")) == "arrow=8192"
    assert arrow_batch() == "arrow=2048"  # deltavec's own default when nobody set one
