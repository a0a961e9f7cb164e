"""A bad set-up stops the job with one clear line and exit code 2, before it writes anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deltavec.cli import main
from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow

PAPERS = [{"id": 1, "title": "A title", "abstract": "An abstract."}]


def _run(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main([*extra, "run", "--once", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("deltavec: error:")]
    assert len(lines) == 1, err
    return code, lines[0]


def _untouched(tmp_path: Path) -> None:
    assert not (tmp_path / "target").exists()
    assert not (tmp_path / "target_quarantine").exists()
    assert not (tmp_path / "checkpoint").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _run(tmp_path / "nope.toml", capsys)
    assert code == 2
    assert line == f"deltavec: error: config file {tmp_path / 'nope.toml'} does not exist"


def test_unknown_key_and_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _run(write_config(tmp_path, model={"nmae": "x"}), capsys)
    assert code == 2 and "model.nmae: unknown key (valid: name, revision," in line
    code, line = _run(write_config(tmp_path, model={"batch_tokens": -5}), capsys)
    assert code == 2 and "model.batch_tokens: Input should be greater than 0 (got -5)" in line


@pytest.mark.parametrize(
    ("make", "sections", "expected"),
    [
        (None, {}, "source table {source} does not exist"),
        ("parquet", {}, "source {source} is not a Delta table (no _delta_log)"),
        (
            "delta",
            {"source": {"template": "{title} [SEP] {summary}"}},
            "template column 'summary' is not in source {source} (columns: id, title, abstract)",
        ),
        (
            "delta",
            {"source": {"key": ["doc_id"]}},
            "key column 'doc_id' is not in source {source} (columns: id, title, abstract)",
        ),
        (
            "double_key",
            {},
            "key column 'id' has type double, which cannot be a MERGE key (use a string, integer, "
            "decimal, date or timestamp column)",
        ),
        (
            "delta",
            {"source": {"mode": "changes"}, "_no_cdf": {}},
            "source {source} does not record its Change Data Feed, which mode 'changes' reads; "
            "run ALTER TABLE ... SET TBLPROPERTIES (delta.enableChangeDataFeed = true) "
            "or use mode 'append'",
        ),
    ],
)
def test_source_problems(
    spark: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: str | None,
    sections: dict[str, Any],
    expected: str,
) -> None:
    source = tmp_path / "source"
    cdf = "_no_cdf" not in sections
    sections = {k: v for k, v in sections.items() if not k.startswith("_")}
    if make == "parquet":
        spark.createDataFrame(PAPERS).write.parquet(str(source))
    elif make == "delta":
        write_rows(spark, source, PAPERS, cdf=cdf)
    elif make == "double_key":
        write_rows(
            spark,
            source,
            [{"id": 1.5, "title": "t", "abstract": "a"}],
            schema="id double, title string, abstract string",
        )
    code, line = _run(write_config(tmp_path, **sections), capsys)
    assert code == 2
    assert line == "deltavec: error: " + expected.format(source=source)
    _untouched(tmp_path)


def test_target_with_incompatible_schema_or_other_model(
    spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(spark, tmp_path / "source", PAPERS)
    target = tmp_path / "target"
    spark.createDataFrame([(1, "x")], "id long, embedding string").write.format("delta").save(
        str(target)
    )
    code, line = _run(write_config(tmp_path), capsys)
    assert code == 2
    assert line == (
        f"deltavec: error: target {target} has an incompatible schema: column embedding is "
        "string, deltavec writes array<float>"
    )
    shutil.rmtree(target)

    config = write_config(tmp_path)
    Job(load_config(config), spark).run(once=True)
    spark.sql(
        f"ALTER TABLE delta.`{target}` SET TBLPROPERTIES ('deltavec.model' = 'someone/else@1234')"
    )
    code, line = _run(config, capsys)
    assert code == 2
    assert line.startswith(
        f"deltavec: error: target {target} holds vectors from model someone/else@1234, but this "
        "job uses sentence-transformers/all-MiniLM-L6-v2@"
    )
    assert line.endswith(
        "run 'deltavec reembed --model ...' to switch models, or write to a new target"
    )


def test_models_that_cannot_be_used(
    spark: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model_path: str,
) -> None:
    write_rows(spark, tmp_path / "source", PAPERS)
    code, line = _run(write_config(tmp_path, model={"name": str(tmp_path / "no-model")}), capsys)
    assert (code, line) == (
        2,
        f"deltavec: error: model folder {tmp_path / 'no-model'} does not exist",
    )

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, line = _run(write_config(tmp_path, model={"name": "acme/not-cached-anywhere"}), capsys)
    assert code == 2
    assert line.startswith(
        "deltavec: error: model 'acme/not-cached-anywhere' cannot be loaded: it is not a local "
        "folder and not in the Hugging Face cache, or the Hub is unreachable"
    )

    # Modules that end in token vectors (no Pooling, as a ColBERT-style model):
    # no single vector per text. (An encoder-decoder such as T5 is not one of these:
    # sentence-transformers embeds with its encoder, and so does deltavec.)
    tokens_only = tmp_path / "token-vectors"
    shutil.copytree(model_path, tokens_only)
    modules = json.loads((tokens_only / "modules.json").read_text())
    (tokens_only / "modules.json").write_text(json.dumps(modules[:1]))
    code, line = _run(write_config(tmp_path, model={"name": str(tokens_only)}), capsys)
    assert code == 2
    assert line.startswith(
        f"deltavec: error: model {tokens_only} does not produce one fixed-size vector"
    )
    _untouched(tmp_path)


def test_remote_code_never_runs_unless_allowed(
    spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], model_path: str
) -> None:
    write_rows(spark, tmp_path / "source", PAPERS)
    folder = tmp_path / "custom-model"
    shutil.copytree(model_path, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertModel\n"
        "class CustomModel(BertModel):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))

    summary = Job(load_config(write_config(tmp_path, model={"name": str(folder)})), spark).run(
        once=True
    )
    assert summary.embedded == 1
    assert not marker.exists()  # the model loaded as plain BERT; its code never ran

    from deltavec.embed.encoder import Encoder, EncoderSpec

    Encoder(EncoderSpec(model=str(folder), device="cpu", trust_remote_code=True))
    assert marker.read_text() == "ran"  # the switch is what kept it off


def test_checkpoint_of_another_source(
    spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(spark, tmp_path / "source", PAPERS)
    write_rows(spark, tmp_path / "other", PAPERS)
    Job(load_config(write_config(tmp_path)), spark).run(once=True)
    other = write_config(tmp_path, source={"path": str(tmp_path / "other")})

    code, line = _run(other, capsys)
    assert code == 2
    assert line == (
        f"deltavec: error: checkpoint {tmp_path / 'checkpoint'} belongs to another source table "
        f"({tmp_path / 'source'}); give this source its own checkpoint.location"
    )
    # Without deltavec's own notes, Delta's DIFFERENT_DELTA_TABLE_READ_BY_STREAMING_SOURCE
    # is what stops the stream; it is translated into advice.
    shutil.rmtree(tmp_path / "checkpoint" / "_deltavec")
    code, line = _run(other, capsys)
    assert code == 2
    assert line.startswith(
        f"deltavec: error: checkpoint {tmp_path / 'checkpoint'} was created for a different "
        f"source table than {tmp_path / 'other'}; point checkpoint.location at a new folder"
    )


def test_source_schema_change_while_running_stops_cleanly(spark: Any, tmp_path: Path) -> None:
    import threading

    from deltavec.errors import SchemaChangedError

    source = tmp_path / "source"
    write_rows(spark, source, PAPERS)
    job = Job(load_config(write_config(tmp_path, trigger={"interval": "1 second"})), spark)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            job.run(once=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        commits = tmp_path / "checkpoint" / "commits"
        for _ in range(600):
            if (commits / "0").exists():
                break
            worker.join(0.5)
        before = read_target(spark, tmp_path / "target")
        # The abstract column disappears (schema overwritten) under the running job,
        # and new rows arrive in the new shape.
        new_shape = spark.createDataFrame([(2, "Only a title")], "id long, title string")
        new_shape.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(
            str(source)
        )
        new_shape.withColumn("id", new_shape.id + 1).write.format("delta").mode("append").save(
            str(source)
        )
        worker.join(300)
    finally:
        job.request_stop()
        worker.join(60)
    assert len(failure) == 1 and isinstance(failure[0], SchemaChangedError), failure
    assert "\n" not in str(failure[0]) and "restart" in str(failure[0])
    assert read_target(spark, tmp_path / "target") == before


def test_secrets_stay_out_of_errors_and_logs(tmp_path: Path) -> None:
    secret = "S3cr3t-Value-Never-Printed"
    config = write_config(tmp_path, spark={"master": "local[1]"})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltavec.cli",
            "--verbose",
            "run",
            "--once",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **__import__("os").environ,
            "DELTAVEC_SPARK__CONF": json.dumps({"spark.hadoop.fs.s3a.secret.key": secret}),
            "AWS_SECRET_ACCESS_KEY": secret,
        },
    )
    assert result.returncode == 2
    assert secret not in result.stdout + result.stderr
    assert f"deltavec: error: source table {tmp_path / 'source'} does not exist" in result.stderr


def test_a_set_up_error_waits_for_the_model_still_loading(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that exits while a thread still imports torch aborts (SIGABRT) instead
    of exiting 2 with the error's line: ``run`` returns only once the load has ended."""
    from deltavec.errors import SourceError

    slow_load = Job._load_model

    def _load_model(self: Job) -> Any:
        time.sleep(3)  # a driver whose JVM started before torch was imported
        return slow_load(self)

    monkeypatch.setattr(Job, "_load_model", _load_model)
    job = Job(load_config(write_config(tmp_path)), spark)  # no source table
    with pytest.raises(SourceError, match="does not exist"):
        job.run(once=True)
    assert job._model_load is not None and job._model_load.done()
