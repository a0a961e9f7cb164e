"""The job's embed function, writing down every row the model ran on (to count calls).

Spark pickles the function to its Python workers by reference, so this module must
be importable there: the test session puts the repository root on their path.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltavec.columns import KEY_JSON
from deltavec.embed.udf import EmbedBatches

if TYPE_CHECKING:
    import pyarrow as pa

    from deltavec.embed.encoder import Encoder


@dataclass(frozen=True)
class CountingEmbed(EmbedBatches):
    """``EmbedBatches`` that appends the key of each row it embeds to a file in ``log_dir``."""

    log_dir: str = ""

    def _embed(self, encoder: Encoder, batch: pa.RecordBatch) -> pa.RecordBatch:
        keys = batch.column(batch.schema.get_field_index(KEY_JSON)).to_pylist()
        name = Path(self.log_dir) / f"{os.getpid()}-{uuid.uuid4().hex}.keys"
        name.write_text("".join(f"{key}\n" for key in keys), encoding="utf-8")
        return super()._embed(encoder, batch)


def embedded_keys(log_dir: Path) -> list[str]:
    """Every key the workers embedded, once per time the model ran on it."""
    return [
        line for path in sorted(log_dir.glob("*.keys")) for line in path.read_text().splitlines()
    ]
