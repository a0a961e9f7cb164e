"""What a user would write instead of deltavec: the Spark UDF peers and the int8 CPU peer.

Both use sentence-transformers with the same model folder, so their vectors equal
deltavec's; only the way the model meets Spark differs.

* ``naive_udf``: the pattern of the blog post this project started from. A
  pandas UDF that loads the model inside the function (so once per Arrow batch),
  slices the batch into 20-row chunks in arrival order (no length sorting) and
  copies each chunk back with ``.cpu().detach().numpy()``.
* ``predict_batch_udf``: Spark's own ``pyspark.ml.functions.predict_batch_udf``,
  which loads the model once per Python worker and feeds it ``batch_size`` rows
  at a time.

* ``st_onnx_int8``: sentence-transformers on ONNX Runtime with its dynamically
  quantized int8 export (``backend="onnx"`` + ``export_dynamic_quantized_onnx_model``),
  what a CPU user would pick instead of deltavec's ``precision = "int8"``. Where
  ``optimum-onnx`` does not install (its releases pin transformers below 4.58), the
  same model is built the way optimum builds it: the transformer exported to ONNX
  by torch, quantized by ``onnxruntime.quantization`` (per-channel int8 weights,
  uint8 activations), run by ONNX Runtime with sentence-transformers' batching
  (sorted by length, ``batch_size`` rows) and the model's mean pooling and L2
  normalisation.

The UDFs are built by factories so the model folder travels to the workers as a
plain string inside the pickled closure.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# At module level: pandas_udf reads the type hints below by name in this module.
import pandas as pd

NAIVE_CHUNK_ROWS = 20


def naive_udf(model_path: str) -> Any:
    """The seed article's pandas UDF: ``array<float>`` per row."""
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    @pandas_udf(ArrayType(FloatType()))  # type: ignore[misc]
    def embed(texts: pd.Series) -> pd.Series:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device="cpu")
        vectors: list[Any] = []
        for start in range(0, len(texts), NAIVE_CHUNK_ROWS):
            chunk = texts.iloc[start : start + NAIVE_CHUNK_ROWS].tolist()
            vectors.extend(model.encode(chunk, convert_to_tensor=True).cpu().detach().numpy())
        return pd.Series(vectors)

    return embed


def predict_batch(model_path: str, batch_size: int) -> Any:
    """Spark's ``predict_batch_udf`` around sentence-transformers' ``encode``."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    def make_predict_fn() -> Callable[[Any], Any]:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device="cpu")

        def predict(texts: Any) -> Any:
            return model.encode(texts.tolist(), batch_size=batch_size, convert_to_numpy=True)

        return predict

    return predict_batch_udf(
        make_predict_fn, return_type=ArrayType(FloatType()), batch_size=batch_size
    )


def st_onnx_int8(model_path: str, work: Path) -> tuple[Callable[[list[str], int], Any], str]:
    """The int8 ONNX Runtime peer: ``encode(texts, batch_size)`` and how it was built.

    Raises:
        ImportError: neither optimum-onnx nor onnxruntime is importable here.
    """
    from deltavec.embed.int8 import full_range_activations

    config = "avx512_vnni" if full_range_activations() else "avx2"
    folder = work / "st-onnx-int8"
    if not folder.exists():
        # The export writes onnx/ into the model folder: a copy keeps the package's clean.
        shutil.copytree(model_path, folder)
    try:
        from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

        exported = SentenceTransformer(str(folder), backend="onnx", device="cpu")
        export_dynamic_quantized_onnx_model(exported, config, str(folder))
        model = SentenceTransformer(
            str(folder),
            backend="onnx",
            device="cpu",
            model_kwargs={"file_name": f"onnx/model_qint8_{config}.onnx"},
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the optimum path: use the fallback
        reason = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        return _onnxruntime_int8(folder, reduce_range=config == "avx2"), (
            f"optimum's path failed here ({reason[:120]}); the same export by torch.onnx + "
            f"onnxruntime.quantization (per-channel, {config}), sentence-transformers' batching"
        )

    def encode(texts: list[str], batch_size: int) -> Any:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)

    return encode, f"sentence-transformers backend='onnx', export_dynamic_quantized({config!r})"


def _onnxruntime_int8(folder: Path, *, reduce_range: bool) -> Callable[[list[str], int], Any]:
    """ONNX Runtime int8 of a mean-pooling, normalising model (the default one)."""
    import numpy as np
    import onnxruntime
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    transformer = st[0]
    fp32 = folder / "onnx-fallback" / "model.onnx"
    int8 = folder / "onnx-fallback" / "model_qint8.onnx"
    if not int8.exists():
        fp32.parent.mkdir(exist_ok=True)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        sample = torch.ones(2, 8, dtype=torch.long)

        class Hidden(torch.nn.Module):
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: Any, mask: Any, types: Any) -> Any:
                out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
                return out.last_hidden_state

        torch.onnx.export(
            Hidden(transformer.auto_model).eval(),
            (sample, sample, torch.zeros_like(sample)),
            str(fp32),
            input_names=names,
            output_names=["hidden"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
            opset_version=17,
            dynamo=False,
        )
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
        )
    session = onnxruntime.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    tokenizer = transformer.tokenizer
    window = st.max_seq_length

    def encode(texts: list[str], batch_size: int) -> Any:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), st.get_embedding_dimension()), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=window,
                return_tensors="np",
            )
            mask = batch["attention_mask"].astype(np.int64)
            hidden = session.run(
                None,
                {
                    "input_ids": batch["input_ids"].astype(np.int64),
                    "attention_mask": mask,
                    "token_type_ids": np.zeros_like(mask),
                },
            )[0]
            pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    return encode
