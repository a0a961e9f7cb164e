"""Query vectors on ONNX Runtime are still the model's own, or are not made at all.

``onnx_query_encoder`` moves only the transformer of a model to ONNX Runtime.
Every model of the zoo (one per architecture or module mix deltavec supports)
gets query vectors equal to ``SentenceTransformer.encode`` with its query
prompt; a graph whose vectors are off is refused by the check, never served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from deltavec.embed.encoder import Encoder, EncoderSpec
from deltavec.embed.models import query_prompt, resolve_model
from deltavec.embed.onnx_queries import OnnxUnavailable, onnx_query_encoder
from tests.embed.model_zoo import ZooModel
from tests.embed.onnx_faults import drift_onnx_sessions

QUERIES = [
    "Which proteins fold fastest?",
    "PX004217",
    "a query long enough to be cut at the window " * 60,
]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _reference(model: str, window: int) -> Any:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model, device="cpu")
    reference.max_seq_length = min(reference.max_seq_length, window)
    return reference


def test_the_default_models_query_vectors_on_onnx_are_sentence_transformers_own(
    model_path: str, st_model: Any
) -> None:
    torch_encoder = Encoder(EncoderSpec(model=model_path, device="cpu", threads=1))
    fast = onnx_query_encoder(torch_encoder)

    assert (fast.runtime, torch_encoder.runtime) == ("onnx", "torch")
    vectors, _ = fast.encode(QUERIES[:2])
    expected = st_model.encode(QUERIES[:2])
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)
    # The torch encoder is left as it was: nothing else in the process changes runtime.
    again, _ = torch_encoder.encode(QUERIES[:2])
    np.testing.assert_allclose(again, expected, rtol=0, atol=1e-6)
    # A second request for the same encoder reuses the export.
    assert onnx_query_encoder(torch_encoder) is fast


@pytest.mark.slow
def test_every_zoo_model_gets_its_own_query_vectors_on_onnx(model_zoo: list[ZooModel]) -> None:
    for model in model_zoo:
        folder = resolve_model(model.name)
        torch_encoder = Encoder(EncoderSpec(model=folder, device="cpu", threads=1))
        prompt = query_prompt(None, torch_encoder.prompts)
        # Every architecture deltavec supports exports and passes the check today;
        # one that stops doing so (a new transformers) would fall back to torch.
        fast = onnx_query_encoder(torch_encoder, prompt=prompt)
        reference = _reference(folder, torch_encoder.max_tokens)
        vectors, _ = fast.encode(QUERIES, prompt=prompt)
        expected = reference.encode(QUERIES, prompt=prompt)
        assert _cosine(vectors, expected).min() >= 0.9999, model.case
        norms = np.linalg.norm(vectors, axis=1), np.linalg.norm(expected, axis=1)
        assert np.allclose(*norms, rtol=1e-3), model.case


def test_an_export_whose_vectors_differ_from_torchs_is_refused(
    model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    drift_onnx_sessions(monkeypatch)
    torch_encoder = Encoder(EncoderSpec(model=model_path, device="cpu", threads=1))
    with pytest.raises(OnnxUnavailable, match="differ from torch's"):
        onnx_query_encoder(torch_encoder)


def test_an_int8_encoder_keeps_torch(model_path: str) -> None:
    int8 = Encoder(EncoderSpec(model=model_path, device="cpu", precision="int8", threads=1))
    with pytest.raises(OnnxUnavailable, match="int8"):
        onnx_query_encoder(int8)
