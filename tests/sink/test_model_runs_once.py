"""The model runs once per changed row of a micro-batch, whatever the batch writes.

Each write the sink makes (the MERGE of existing keys and the append of new ones
into the target, the quarantine's MERGE after them) tells Spark's cache that a
table changed. A frame of the batch that Spark has cached and that still reads
the latest target would be computed again from the target the batch just wrote:
the model would run again on rows it has already embedded, and the batch would
take twice the model time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import read_target, write_config, write_rows
from tests.counting_embed import CountingEmbed, embedded_keys

pytestmark = pytest.mark.slow


def test_a_batch_of_updates_new_keys_and_a_bad_row_embeds_each_row_once(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from delta.tables import DeltaTable

    log_dir = tmp_path / "embedded"
    log_dir.mkdir()
    real = Job.embed_batches

    def counting(job: Job) -> CountingEmbed:
        embed = real(job)
        fields = {f.name: getattr(embed, f.name) for f in dataclasses.fields(embed)}
        return CountingEmbed(**fields, log_dir=str(log_dir))

    monkeypatch.setattr(Job, "embed_batches", counting)
    source = tmp_path / "source"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    write_rows(
        spark, source, [{"id": i, "title": f"Paper {i}", "abstract": "a"} for i in range(10)]
    )
    Job(config, spark).run(once=True)
    first = Counter(embedded_keys(log_dir))
    assert sorted(first.values()) == [1] * 10

    # One micro-batch that the MERGE (three updates), the append (ten new keys)
    # and the quarantine (one blank row) all write.
    DeltaTable.forPath(spark, str(source)).update("id < 3", {"title": "concat(title, ' v2')"})
    write_rows(
        spark,
        source,
        [{"id": i, "title": f"Paper {i}", "abstract": "b"} for i in range(10, 20)]
        + [{"id": 20, "title": " ", "abstract": ""}],
    )
    second = Job(config, spark).run(once=True)

    assert (second.embedded, second.quarantined) == (13, 1)
    runs = Counter(json.loads(key)["id"] for key in embedded_keys(log_dir)) - Counter(
        json.loads(key)["id"] for key in first.elements()
    )
    assert sorted(runs) == [0, 1, 2, *range(10, 20)]
    assert set(runs.values()) == {1}, f"the model ran again on rows it had embedded: {runs}"
    target = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    assert sorted(target) == list(range(20))
    revised = [hashlib.sha256(f"Paper {i} v2 [SEP] a".encode()).hexdigest() for i in range(3)]
    assert [target[i]["text_hash"] for i in range(3)] == revised
