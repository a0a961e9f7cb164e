"""The model's transformer on ONNX Runtime, for query vectors on a CPU.

A search server embeds a few short queries at a time: for the default model,
1-4 short queries on one thread came out 2.1-2.4x faster on ONNX Runtime than on
torch, tokenizing included (README, Serving search). Only the model's first
module, the Hugging Face transformer, moves: it is exported with ``torch.onnx``
from the weights already loaded, and the rest of the model's own module stack
(pooling, dense layers, normalisation) still runs in torch on its output, as
``Encoder`` runs it. Tokenizing, prompts, windows and batching are the encoder's.

The vectors must stay the model's own, so an export is used only after it gives
the torch encoder's vectors for a set of probe texts (short, long, chunked, with
the query prompt); otherwise ``OnnxUnavailable`` says why and the caller keeps
torch. fp32 on the CPU only: an int8 or GPU encoder is left as it is.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.errors import DeltavecError

if TYPE_CHECKING:
    from deltavec.embed.encoder import Encoder

log = logging.getLogger(__name__)

# How close an export's vectors must be to torch's: float32 sums taken in
# another order differ by about 1e-7; a wrong graph by far more.
MIN_COSINE = 0.99999
MAX_RELATIVE_ERROR = 1e-4
_PROBES = (
    "a",
    "Which proteins fold fastest?",
    "PX004217 kinase inhibitor assay results, 2021",
)


class OnnxUnavailable(DeltavecError):
    """The encoder cannot run its transformer on ONNX Runtime; it stays on torch."""


# Per encoder and prompt, what onnx_query_encoder gave (an encoder, or the reason
# there is none): a server reopening the same model exports it once.
_made: weakref.WeakKeyDictionary[Encoder, dict[tuple[int, str], Encoder | OnnxUnavailable]] = (
    weakref.WeakKeyDictionary()
)
_made_lock = threading.Lock()


def installed() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_query_encoder(encoder: Encoder, *, threads: int = 1, prompt: str = "") -> Encoder:
    """A copy of ``encoder`` whose transformer runs on ONNX Runtime.

    Args:
        encoder: a CPU fp32 encoder; it is not changed.
        threads: ONNX Runtime's intra-op threads for one forward pass.
        prompt: the query prompt the probes are checked with.

    Raises:
        OnnxUnavailable: not installed, not a CPU fp32 encoder, the model's first
            module is not a Hugging Face transformer, the export failed, or its
            vectors differ from torch's.
    """
    with _made_lock:
        made = _made.setdefault(encoder, {})
        key = (threads, prompt)
        if key not in made:
            try:
                made[key] = _make(encoder, threads, prompt)
            except OnnxUnavailable as exc:
                made[key] = exc
        outcome = made[key]
    if isinstance(outcome, OnnxUnavailable):
        raise outcome
    return outcome


def _make(encoder: Encoder, threads: int, prompt: str) -> Encoder:
    import torch

    if not installed():
        raise OnnxUnavailable("onnx and onnxruntime are not installed")
    if (
        encoder.device != "cpu"
        or encoder.dtype != torch.float32
        or encoder.spec.precision == "int8"
    ):
        raise OnnxUnavailable(
            f"query vectors stay on torch for a {encoder.device} {encoder.spec.precision} model"
        )
    started = time.perf_counter()
    try:
        session = _session(_export(encoder), threads)
    except OnnxUnavailable:
        raise
    except Exception as exc:  # an architecture the exporter cannot take
        raise OnnxUnavailable(f"export failed: {type(exc).__name__}: {exc}") from exc
    names = {i.name for i in session.get_inputs()}

    def transformer(features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: value for name, value in features.items() if name in names}
        hidden: np.ndarray = session.run(None, feeds)[0]
        return hidden

    twin = encoder.with_transformer(transformer, runtime="onnx")
    _check(encoder, twin, prompt)
    log.info(
        "query vectors on ONNX Runtime (export and check in %.1f s)", time.perf_counter() - started
    )
    return twin


def _export(encoder: Encoder) -> bytes:
    """The model's transformer as an ONNX graph: token ids in, token embeddings out."""
    import torch

    first = encoder.model[0]
    auto = getattr(first, "auto_model", None)
    if auto is None:
        raise OnnxUnavailable(f"the model's first module is a {type(first).__name__}")
    names = ["input_ids", "attention_mask"]
    if encoder.uses_token_types:
        names.append("token_type_ids")

    model: Any = auto

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    # One padded row in the sample, so the attention mask is traced as data.
    tokens = (list(encoder.tokenizer("probe text")["input_ids"]) * 8)[:8]
    ids = torch.tensor([tokens, tokens[:4] + [encoder.pad_id] * 4])
    mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
    sample = [ids, mask, torch.zeros_like(ids)][: len(names)]
    with tempfile.TemporaryDirectory(prefix="deltavec-onnx-") as folder, warnings.catch_warnings():
        graph = Path(folder) / "transformer.onnx"
        # The tracer warns about every Python branch on a tensor; the check after
        # the export is what decides whether the graph is right.
        warnings.simplefilter("ignore")
        # eval() on the wrapper: the exporter puts the module back into the mode it
        # found it in, and a wrapper left in training mode would switch dropout on
        # in the torch model the server still uses.
        _trace(Hidden().eval(), tuple(sample), graph, names)
        return graph.read_bytes()


def _trace(module: Any, sample: tuple[Any, ...], graph: Path, names: list[str]) -> None:
    import torch

    torch.onnx.export(
        module,
        sample,
        str(graph),
        input_names=names,
        output_names=["token_embeddings"],
        dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "token_embeddings"]},
        opset_version=17,
        dynamo=False,
    )


def _session(graph: bytes, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _check(torch_encoder: Encoder, onnx_encoder: Encoder, prompt: str) -> None:
    """Refuse an export whose vectors are not torch's, for short and chunked texts."""
    long = " ".join(_PROBES[1:] * torch_encoder.max_tokens)
    texts = [*_PROBES, long]
    expected, _ = torch_encoder.encode(texts, prompt=prompt)
    got, _ = onnx_encoder.encode(texts, prompt=prompt)
    norms = np.maximum(np.linalg.norm(expected, axis=1), 1e-12)
    cosine = float(
        (
            (expected * got).sum(axis=1) / norms / np.maximum(np.linalg.norm(got, axis=1), 1e-12)
        ).min()
    )
    error = float((np.abs(expected - got).max(axis=1) / norms).max())
    if cosine < MIN_COSINE or error > MAX_RELATIVE_ERROR:
        raise OnnxUnavailable(
            f"the export's vectors differ from torch's (cosine {cosine:.6f}, "
            f"relative error {error:.1e})"
        )
