"""Nearest-neighbour search over a deltavec target, without Spark or a JVM.

The target is read with the ``deltalake`` (delta-rs) package into one contiguous
float32 matrix; the query is embedded with the model the table records, and
scored by a matrix product (the vectors are L2-normalised, so the product is the
cosine similarity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streaming.columns import EMBEDDING, MODEL
from streaming.errors import TargetError

if TYPE_CHECKING:
    import pyarrow as pa

    from streaming.encoder import Encoder

MODEL_PROPERTY = "deltavec.model"
KEYS_PROPERTY = "deltavec.keys"


@dataclass(frozen=True)
class Hit:
    key: dict[str, Any]
    score: float


class VectorIndex:
    """The vectors of one target table version, held as an (n, dim) float32 matrix."""

    def __init__(
        self,
        path: str,
        *,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        from deltalake import DeltaTable

        self.path = path
        self.table = DeltaTable(path, storage_options=storage_options)
        properties = self.table.metadata().configuration
        self.model_identity = properties.get(MODEL_PROPERTY, "")
        self.keys = [k for k in properties.get(KEYS_PROPERTY, "").split(",") if k]
        if not self.keys:
            raise TargetError(f"{path} is not a deltavec target (no {KEYS_PROPERTY} property)")
        self._load()

    def _load(self) -> None:
        import pyarrow.compute as pc

        data = self.table.to_pyarrow_table(columns=[*self.keys, EMBEDDING, MODEL])
        models = pc.unique(data.column(MODEL)).to_pylist()
        if len(models) > 1:
            raise TargetError(
                f"target {self.path} mixes vectors of {len(models)} models ({', '.join(models)}); "
                "queries against it would compare incomparable vectors"
            )
        self.key_table: pa.Table = data.select(self.keys)
        self.matrix = _as_matrix(data.column(EMBEDDING))
        self.version = self.table.version()

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def search(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The k rows most similar to one query vector, best first."""
        if len(self) == 0:
            return []
        scores = self.matrix @ query.astype(np.float32).reshape(-1)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        keys = self.key_table.take(top).to_pylist()
        return [Hit(key=key, score=float(scores[i])) for key, i in zip(keys, top, strict=True)]

    def search_text(self, text: str, encoder: Encoder, k: int = 10) -> list[Hit]:
        vectors, _ = encoder.encode([text])
        return self.search(vectors[0], k)


def _as_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An (n, dim) float32 matrix from a list<float> column, with no per-row objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = pc.list_flatten(column.combine_chunks() if column.num_chunks > 1 else column.chunk(0))
    values = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size % n:
        raise TargetError("target rows hold vectors of different lengths")
    assert isinstance(flat, pa.Array)
    return np.ascontiguousarray(values.reshape(n, values.size // n))
