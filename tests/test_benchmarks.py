"""The GPU benchmark script must work on a machine that only has the encoder's libraries."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_falls_back_to_the_cpu_and_reports_fidelity() -> None:
    # A subprocess with Spark made unimportable proves the script needs no pyspark.
    code = (
        "import runpy, sys; sys.modules['pyspark'] = None; "
        "runpy.run_path('benchmarks/gpu_encoder.py', run_name='__main__')"
    )
    args = ["--cpu", "--sentences", "6", "--paragraphs", "2", "--rounds", "1"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == 8 and report["tokens"] > 8
    assert report["encoder"] > 0 and report["st_encode"] > 0
    assert report["min_cosine_vs_st_fp32"] >= 0.9999
