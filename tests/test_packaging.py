"""The distribution installs one top-level name, ``deltavec``, beside anything else.

Databricks Runtime ML ships ``mosaicml-streaming``, imported as ``streaming``; a
wheel that also wrote ``site-packages/streaming/`` would break both. These tests
build the real wheel and run the real command next to a foreign ``streaming``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test environment already has setuptools and wheel,
    # and a fresh build environment would need the network.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("deltavec-*.whl")
    return path


def test_the_wheel_holds_only_the_deltavec_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"deltavec"}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("deltavec-")
    # The package is whole: every lifecycle folder, the demo's data, the command.
    for module in (
        "deltavec/cli.py",
        "deltavec/source/stream.py",
        "deltavec/embed/encoder.py",
        "deltavec/sink/batch.py",
        "deltavec/checkpointing/lease.py",
        "deltavec/observe/metrics.py",
        "deltavec/commands/job.py",
        "deltavec/search/index.py",
        "deltavec/runtime/session.py",
        "deltavec/commands/demo_data/papers.jsonl",
        "deltavec/py.typed",
    ):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"deltavec = deltavec.cli:main" in entry_points


def test_a_foreign_streaming_package_and_deltavec_import_side_by_side(tmp_path: Path) -> None:
    # What mosaicml-streaming installs: a top-level package named ``streaming``.
    foreign = tmp_path / "site" / "streaming"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("OWNER = 'mosaicml-streaming'\n")
    env = {
        **os.environ,
        # First on the path, ahead of this checkout: it must not shadow deltavec.
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
    }
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import streaming, deltavec, deltavec.cli, deltavec.embed.udf, deltavec.sink.batch;"
            "print(streaming.OWNER); print(deltavec.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    owner, location = probe.stdout.split()
    assert owner == "mosaicml-streaming"
    assert Path(location) == REPO / "streaming" / "deltavec" / "__init__.py"

    command = Path(sys.executable).with_name("deltavec")
    helped = subprocess.run(
        [str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: deltavec" in helped.stdout


def test_streaming_is_not_a_name_this_project_installs(tmp_path: Path) -> None:
    # Outside the checkout, with only what is installed on the path.
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import streaming"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0
    assert "No module named 'streaming'" in probe.stderr
