"""A driver JVM starts from the classes an earlier run loaded, and never from half an archive.

Real JVMs throughout: one writes its classes when it exits, the next start adopts
the archive, and a JVM told to require it (``-Xshare:on``) starts with it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from deltavec.runtime import class_archive, session
from deltavec.runtime.session import spark_home

PACKAGES = "io.delta:delta-spark_2.13:4.0.1"


def _java(options: str, *more: str) -> subprocess.CompletedProcess[str]:
    java = shutil.which("java")
    assert java is not None
    env = {k: v for k, v in os.environ.items() if k != "JDK_JAVA_OPTIONS"}
    return subprocess.run(
        [java, *shlex.split(options), *more, "-version"], capture_output=True, text=True, env=env
    )


def test_the_first_start_writes_the_archive_and_the_next_maps_it(tmp_path: Path) -> None:
    first = class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    assert first.startswith("-XX:ArchiveClassesAtExit=")
    # Another start while the first run lives neither writes nor waits.
    assert class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path) == ""

    assert _java(first).returncode == 0  # the JVM writes its classes as it exits
    second = class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    assert second.startswith("-XX:SharedArchiveFile=")
    archive = Path(shlex.split(second)[0].split("=", 1)[1])
    assert archive.is_file() and not list(tmp_path.glob("*.part"))
    assert not list(tmp_path.glob("*.claim")), "the claim ends with the adoption"
    required = _java(second, "-Xshare:on")
    assert required.returncode == 0, required.stderr
    # Another Spark (another set of JARs or packages) has an archive of its own.
    other = class_archive.driver_java_options(spark_home(), PACKAGES + ",x:y:1", tmp_path)
    assert other.startswith("-XX:ArchiveClassesAtExit=")


def test_a_cache_folder_with_a_space_in_its_name_works(tmp_path: Path) -> None:
    folder = tmp_path / "my cache"
    first = class_archive.driver_java_options(spark_home(), PACKAGES, folder)
    assert _java(first).returncode == 0
    second = class_archive.driver_java_options(spark_home(), PACKAGES, folder)
    required = _java(second, "-Xshare:on")
    assert required.returncode == 0, required.stderr


def test_an_archive_cut_short_is_never_adopted(tmp_path: Path) -> None:
    options = class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    assert _java(options).returncode == 0
    part = next(tmp_path.glob("*.part"))
    # HotSpot writes the header last: a JVM killed while writing leaves a file
    # without it, and mapping a cut-short archive would kill the next JVM.
    whole = part.read_bytes()
    part.write_bytes(bytes(16) + whole[16 : len(whole) // 2])
    assert class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path) == ""
    assert part.exists() and not list(tmp_path.glob("*.jsa"))


def test_a_day_old_part_of_any_set_up_is_dropped(tmp_path: Path) -> None:
    # Another Spark's archives: one written a minute ago, one two days ago that no
    # start of that Spark came to adopt (a throw-away installation's).
    recent, stale = tmp_path / "0123abcd.a.part", tmp_path / "0123abcd.b.part"
    for part in (recent, stale):
        part.write_bytes(b"\xa8\xab\x0b\xf0" + bytes(100))
    old = time.time() - 2 * 86_400
    os.utime(stale, (old, old))
    assert class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    assert recent.exists() and not stale.exists()


def test_a_claim_left_by_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    assert class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    claim = next(tmp_path.glob("*.claim"))
    claim.write_text("999999999")  # a pid no process has
    assert class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path) == "", (
        "its JVM may still be writing"
    )
    old = time.time() - 120
    os.utime(claim, (old, old))
    taken = class_archive.driver_java_options(spark_home(), PACKAGES, tmp_path)
    assert taken.startswith("-XX:ArchiveClassesAtExit=")
    assert claim.read_text().split()[0] == str(os.getpid())


def test_only_a_jvm_this_process_launches_gets_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert session._launches_jvm()
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "41234")  # spark-submit started the JVM
    assert not session._launches_jvm()
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT")
    (tmp_path / "spark-defaults.conf").write_text("spark.driver.extraJavaOptions -Dx=1\n")
    assert not session._launches_jvm(), "the defaults file's options would be replaced"
