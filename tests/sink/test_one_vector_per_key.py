"""Exactly one up-to-date vector per live key, in the corners a plain stream never meets.

Each test drives the real job (real Spark, real Delta tables, the default model)
through a scenario the kill test does not: a key-changing UPDATE, a null key that
is updated and deleted, one key appended by two commits of one micro-batch, a
model that runs out of memory, a key the target holds twice, a quarantine
retry beside a running job, and a second checkpoint on the same target.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _quarantine(spark: Any, tmp_path: Path) -> list[Any]:
    return spark.read.format("delta").load(str(tmp_path / "target_quarantine")).collect()


def test_changes_mode_follows_key_changes_and_null_keys_without_leftovers(
    spark: Any, tmp_path: Path
) -> None:
    from delta.tables import DeltaTable

    source = tmp_path / "source"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    write_rows(
        spark,
        source,
        [
            {"id": 1, "title": "Moves to key ten", "abstract": "a"},
            {"id": 2, "title": "Stays", "abstract": "b"},
            {"id": 3, "title": "Swaps with four", "abstract": "c"},
            {"id": 4, "title": "Swaps with three", "abstract": "d"},
            {"id": None, "title": "No key yet", "abstract": "e"},
        ],
    )
    first = Job(config, spark).run(once=True)
    assert first.quarantined == 1

    table = DeltaTable.forPath(spark, str(source))
    # An UPDATE that changes a key: the old key's vector must go.
    table.update("id = 1", {"id": "10"})
    # Two keys swapped in one commit: both keep a vector, of the other's text.
    table.update("id IN (3, 4)", {"id": "7 - id"})
    # A keyless row edited twice: still one quarantine row, with the newest text.
    table.update("id IS NULL", {"title": "'No key, edited'"})
    table.update("id IS NULL", {"title": "'No key, edited twice'"})
    second = Job(config, spark).run(once=True)

    target = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    assert sorted(target) == [2, 3, 4, 10]
    assert target[10]["text_hash"] == _sha("Moves to key ten [SEP] a")
    assert target[3]["text_hash"] == _sha("Swaps with three [SEP] d")
    assert target[4]["text_hash"] == _sha("Swaps with four [SEP] c")
    [keyless] = _quarantine(spark, tmp_path)
    assert (keyless["reason"], keyless["value"]) == ("null_key", "No key, edited twice [SEP] e")
    # Key 1 is the one delete; each keyless postimage counts as quarantined once,
    # its preimages count as nothing.
    assert (second.deleted, second.quarantined) == (1, 2)

    # Deleting the keyless row empties the quarantine; it is neither a delete nor
    # a new quarantine row.
    table.delete("id IS NULL")
    third = Job(config, spark).run(once=True)
    assert _quarantine(spark, tmp_path) == []
    assert (third.deleted, third.quarantined) == (0, 0)
    assert sorted(r["id"] for r in read_target(spark, tmp_path / "target")) == [2, 3, 4, 10]


def _later_loses_on_hash(first: str, second: str) -> tuple[str, str]:
    """The two texts ordered so the later one has the smaller SHA-256: a tie-break by
    hash alone would keep the older text."""
    return (first, second) if _sha(first) > _sha(second) else (second, first)


def test_append_mode_keeps_the_later_commit_of_a_key_read_in_one_batch(
    spark: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    config = load_config(write_config(tmp_path))
    older, newer = _later_loses_on_hash("Draft title [SEP] x", "Final title [SEP] x")
    # Inside the starting snapshot: key 1 appended by two commits.
    write_rows(spark, source, [{"id": 1, "title": older.split(" [SEP] ")[0], "abstract": "x"}])
    write_rows(spark, source, [{"id": 1, "title": newer.split(" [SEP] ")[0], "abstract": "x"}])
    first = Job(config, spark).run(once=True)
    older2, newer2 = _later_loses_on_hash("Second key, old [SEP] y", "Second key, new [SEP] y")
    # After it: key 2 appended by two commits that reach the stream in one micro-batch.
    write_rows(spark, source, [{"id": 2, "title": older2.split(" [SEP] ")[0], "abstract": "y"}])
    write_rows(spark, source, [{"id": 2, "title": newer2.split(" [SEP] ")[0], "abstract": "y"}])
    second = Job(config, spark).run(once=True)

    target = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    assert sorted(target) == [1, 2]
    assert target[1]["text_hash"] == _sha(newer) and target[1]["source_version"] == 1
    assert target[2]["text_hash"] == _sha(newer2) and target[2]["source_version"] == 3
    assert len(second.reports) == 1
    # Two commits of one key are an update, not a duplicate key within a commit.
    assert first.duplicates == second.duplicates == 0


def test_a_model_out_of_memory_keeps_the_old_vector_and_quarantines_nothing(
    spark: Any, tmp_path: Path
) -> None:
    from deltavec.runtime.faults import OUT_OF_MEMORY_ENV

    source = tmp_path / "source"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    write_rows(spark, source, [{"id": 1, "title": "Original", "abstract": "a"}])
    Job(config, spark).run(once=True)
    spark.sql(f"UPDATE delta.`{source}` SET title = 'Too big for the GPU' WHERE id = 1")

    environment = spark.sparkContext.environment
    environment[OUT_OF_MEMORY_ENV] = "Too big"
    try:
        with pytest.raises(Exception, match="out of memory"):
            Job(config, spark).run(once=True)
    finally:
        environment.pop(OUT_OF_MEMORY_ENV, None)
    [kept] = read_target(spark, tmp_path / "target")
    assert kept["text_hash"] == _sha("Original [SEP] a")
    assert _quarantine(spark, tmp_path) == []

    # Once the machine recovers, the replayed batch lands the new vector.
    Job(config, spark).run(once=True)
    [updated] = read_target(spark, tmp_path / "target")
    assert updated["text_hash"] == _sha("Too big for the GPU [SEP] a")
    assert _quarantine(spark, tmp_path) == []


def test_a_key_written_twice_is_repaired_and_retry_waits_for_the_lease(
    spark: Any, tmp_path: Path
) -> None:
    from deltavec.commands import quarantine
    from deltavec.errors import CheckpointError

    source, target = tmp_path / "source", tmp_path / "target"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    write_rows(
        spark,
        source,
        [
            {"id": 1, "title": "Twice", "abstract": "a"},
            {"id": 2, "title": None, "abstract": None},
        ],
    )
    Job(config, spark).run(once=True)

    # A retry beside a running job would race it to append the same new key:
    # it needs the job's lease, and is refused while the job holds it.
    running = Job(config, spark)
    running.take_lease()
    try:
        with pytest.raises(CheckpointError, match="is in use by another deltavec job"):
            quarantine.retry(Job(config, spark))
    finally:
        running.close()

    # What such a race (or any other writer) leaves: key 1 twice in the target.
    spark.read.format("delta").load(str(target)).where("id = 1").write.format("delta").mode(
        "append"
    ).save(str(target))
    assert len([r for r in read_target(spark, target) if r["id"] == 1]) == 2
    spark.sql(f"UPDATE delta.`{source}` SET title = 'Once again' WHERE id = 1")
    Job(config, spark).run(once=True)  # repaired, not failed on every restart
    rows = [r for r in read_target(spark, target) if r["id"] == 1]
    assert [r["text_hash"] for r in rows] == [_sha("Once again [SEP] a")]
    assert [r["key"] for r in _quarantine(spark, tmp_path)] == ['{"id":2}']


def test_a_writer_on_another_checkpoint_is_refused_until_the_target_is_handed_over(
    spark: Any, tmp_path: Path
) -> None:
    from deltavec.commands import quarantine
    from deltavec.errors import TargetError

    source, target = tmp_path / "source", tmp_path / "target"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    # A copied config that names a new checkpoint: its lease is not the owner's.
    elsewhere = config.checkpoint.model_copy(update={"location": str(tmp_path / "elsewhere")})
    copied = config.model_copy(update={"checkpoint": elsewhere})
    write_rows(
        spark,
        source,
        [
            {"id": 1, "title": "Owned", "abstract": "a"},
            {"id": 2, "title": None, "abstract": None},
        ],
    )
    Job(config, spark).run(once=True)
    spark.sql(f"UPDATE delta.`{source}` SET title = 'Fixed' WHERE id = 2")
    before = sorted((r["id"], r["text_hash"]) for r in read_target(spark, target))

    refused = f"target {target} is written by the job of checkpoint {tmp_path / 'checkpoint'}"
    with pytest.raises(TargetError, match=refused) as job_error:
        Job(copied, spark).run(once=True)
    assert "UNSET TBLPROPERTIES ('deltavec.checkpoint')" in str(job_error.value)
    with pytest.raises(TargetError, match=refused):
        quarantine.retry(Job(copied, spark))
    # Neither wrote: key 2 is still quarantined, key 1 untouched.
    assert sorted((r["id"], r["text_hash"]) for r in read_target(spark, target)) == before
    assert [r["key"] for r in _quarantine(spark, tmp_path)] == ['{"id":2}']

    # The owner's job goes on; then the target is handed over as the refusal says.
    Job(config, spark).run(once=True)
    spark.sql(f"ALTER TABLE delta.`{target}` UNSET TBLPROPERTIES ('deltavec.checkpoint')")
    spark.sql(f"UPDATE delta.`{source}` SET title = 'New owner' WHERE id = 1")
    Job(copied, spark).run(once=True)
    with pytest.raises(TargetError, match=f"written by the job of checkpoint {tmp_path}/elsewhere"):
        Job(config, spark).run(once=True)
    rows = sorted((r["id"], r["text_hash"]) for r in read_target(spark, target))
    assert rows == [(1, _sha("New owner [SEP] a")), (2, _sha("Fixed [SEP] "))]
    assert _quarantine(spark, tmp_path) == []
