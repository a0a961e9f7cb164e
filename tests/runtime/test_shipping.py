"""The package archive a driver ships to executors."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from deltavec.runtime.shipping import build_archive


def test_archive_alone_provides_the_package_to_a_worker(tmp_path: Path) -> None:
    archive = build_archive(tmp_path)
    names = zipfile.ZipFile(archive).namelist()
    assert "deltavec/embed/udf.py" in names and "deltavec/embed/encoder.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if "demo_data" in n]  # the driver's business only
    # A Python worker puts the archive first on sys.path and imports from it
    # (cwd is elsewhere, so this checkout is not on the path).
    probe = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "import deltavec.embed.udf; print(deltavec.embed.udf.__file__)",
            str(archive),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == f"{archive}/deltavec/embed/udf.py"
