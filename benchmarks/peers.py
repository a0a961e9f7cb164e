"""What a user would write instead of deltavec: the two Spark UDF peers of the benchmark.

Both use sentence-transformers with the same model folder, so their vectors equal
deltavec's; only the way the model meets Spark differs.

* ``naive_udf``: the pattern of the blog post this project started from. A
  pandas UDF that loads the model inside the function (so once per Arrow batch),
  slices the batch into 20-row chunks in arrival order (no length sorting) and
  copies each chunk back with ``.cpu().detach().numpy()``.
* ``predict_batch_udf``: Spark's own ``pyspark.ml.functions.predict_batch_udf``,
  which loads the model once per Python worker and feeds it ``batch_size`` rows
  at a time.

The functions are built by factories so the model folder travels to the workers
as a plain string inside the pickled closure.
"""

from __future__ import annotations

from collections.abc import Callable
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
