"""Any sentence-transformers model gives exactly the vectors sentence-transformers gives.

Each tiny model of the zoo (tests/embed/model_zoo.py) covers one architecture or
module mix; deltavec's vectors must match ``SentenceTransformer.encode`` with the
model's document prompt, for short texts, texts at the window and texts three
times longer, in the encoder alone and through the whole job, and the query side
must match ``encode(q, prompt_name="query")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.embed.encoder import Encoder, EncoderSpec
from deltavec.embed.models import resolve_model
from tests.conftest import read_target, write_config, write_rows
from tests.embed.model_zoo import ZooModel

QUERY = "Which Proteins fold fastest?"


def _reference(model: ZooModel, window: int) -> Any:
    """sentence-transformers on the model, at the window deltavec uses.

    Only the MPNet case differs from the model's own: with no max_seq_length,
    sentence-transformers takes all 514 positions and fails on longer texts.
    """
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_model(model.name), device="cpu")
    reference.max_seq_length = min(reference.max_seq_length, window)
    return reference


def _texts(reference: Any, words: list[str], window: int) -> list[str]:
    """Two short texts, one of exactly the window's tokens or just past, one of 3x it."""
    tokenizer = reference.tokenizer

    def at_least(tokens: int) -> str:
        n = tokens // 2
        while len(tokenizer(" ".join(words[:n]))["input_ids"]) < tokens:
            n += 1
        return " ".join(words[:n])

    return [
        "A Cat sat on the Mat.",
        "Quantum Chromodynamics binds QUARKS together.",
        at_least(window),
        at_least(3 * window),
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def words(sts_pairs: list[tuple[float, str, str]]) -> list[str]:
    return " ".join(s1 for _, s1, _ in sts_pairs[:600]).split()


def test_every_zoo_model_encodes_like_sentence_transformers(
    model_zoo: list[ZooModel], words: list[str]
) -> None:
    for model in model_zoo:
        encoder = Encoder(EncoderSpec(model=resolve_model(model.name), device="cpu"))
        assert encoder.max_tokens == model.window, model.case
        reference = _reference(model, encoder.max_tokens)
        texts = _texts(reference, words, encoder.max_tokens)
        prompt = encoder.prompt("document") if model.document_prompt else ""
        vectors, stats = encoder.encode(texts, prompt=prompt)
        expected = reference.encode(texts, prompt_name="document")
        assert _cosine(vectors, expected).min() >= 0.9999, model.case
        # Norms too: a model without Normalize keeps its unnormalised vectors.
        norms = np.linalg.norm(vectors, axis=1), np.linalg.norm(expected, axis=1)
        assert np.allclose(*norms, rtol=1e-3), model.case
        assert stats.truncated == 2, model.case  # the at-window text fits; the long one is cut
        # The check can fail: different texts of the same model are far apart.
        assert _cosine(expected[:1], expected[1:2]).max() < 0.99, model.case


def _zoo_source(spark: Any, tmp_path: Path, model_zoo: list[ZooModel], words: list[str]) -> Any:
    """One source table holding every model's texts; returns {id: text}."""
    rows, texts = [], {}
    for number, model in enumerate(model_zoo):
        reference = _reference(model, model.window)
        for i, text in enumerate(_texts(reference, words, model.window)):
            key = number * 10 + i
            rows.append({"id": key, "text": text})
            texts[key] = text
    write_rows(spark, tmp_path / "source", rows, schema="id long, text string")
    return texts


def _config(tmp_path: Path, case: str, model: str, **settings: Any) -> Any:
    (tmp_path / case).mkdir(exist_ok=True)
    return load_config(
        write_config(
            tmp_path / case,
            source={"path": str(tmp_path / "source"), "template": "{text}"},
            model={"name": model, **settings},
        )
    )


@pytest.mark.slow
def test_every_zoo_model_through_the_job_and_search(
    spark: Any, tmp_path: Path, model_zoo: list[ZooModel], words: list[str]
) -> None:
    from deltavec.search import open_search

    # Every case, though the encoder test above already checks each one: the
    # workers, the target and search add their own steps (a Hub id resolved on each
    # worker, the model's window on 3x-window texts, a Dense layer, prompts on both
    # sides, dimensions other than 384). One source holds every model's texts.
    texts = _zoo_source(spark, tmp_path, model_zoo, words)
    for model in model_zoo:
        config = _config(tmp_path, model.case, model.name)
        summary = Job(config, spark).run(once=True)
        assert summary.quarantined == 0, model.case
        assert spark.read.format("delta").load(config.target.quarantine.path).count() == 0
        rows = {r["id"]: r for r in read_target(spark, config.target.path)}
        assert len(rows) == len(texts), model.case  # every text of every model, none lost
        reference = _reference(model, model.window)
        keys = sorted(rows)
        expected = reference.encode([texts[k] for k in keys], prompt_name="document")
        got = np.array([rows[k]["embedding"] for k in keys], dtype=np.float32)
        assert _cosine(got, expected).min() >= 0.9999, model.case
        # The query side needs no config: model, window and query prompt come from the target.
        search = open_search(str(config.target.path))
        query = reference.encode([QUERY], prompt_name="query")
        assert _cosine(search.embed(QUERY)[None, :], query).min() >= 0.9999, model.case


@pytest.mark.slow
def test_a_new_window_is_refused_until_reembed_and_search_follows_it(
    spark: Any, tmp_path: Path, model_zoo: list[ZooModel], words: list[str]
) -> None:
    from deltavec.commands.reembed import Reembed
    from deltavec.errors import TargetError
    from deltavec.search import open_search

    model = next(m for m in model_zoo if m.case == "mpnet-514-positions")
    reference = _reference(model, model.window)
    texts = _texts(reference, words, model.window)
    write_rows(
        spark,
        tmp_path / "source",
        [{"id": i, "text": t} for i, t in enumerate(texts)],
        schema="id long, text string",
    )
    narrow = _config(tmp_path, "window", model.name, max_tokens=256)
    Job(narrow, spark).run(once=True)
    wide = _config(tmp_path, "window", model.name)  # the model's own window: 512

    with pytest.raises(TargetError) as refused:
        Job(wide, spark).run(once=True)
    message = str(refused.value)
    assert "model.max_tokens = 256" in message and "512" in message
    assert "deltavec reembed" in message

    report = Reembed(wide, spark=spark).run()
    assert report.switched and report.rows == len(texts) and report.failed == 0
    rows = {r["id"]: r for r in read_target(spark, wide.target.path)}
    got = np.array([rows[i]["embedding"] for i in range(len(texts))], dtype=np.float32)
    assert _cosine(got, reference.encode(texts, prompt_name="document")).min() >= 0.9999
    search = open_search(str(wide.target.path))
    assert search.encoder.max_tokens == 512
