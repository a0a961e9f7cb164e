"""Column names shared by the Spark side and the Python workers.

Names that start with an underscore live only inside a micro-batch; the rest are
the target table's public schema.
"""

from __future__ import annotations

# Target table.
EMBEDDING = "embedding"
MODEL = "model"
DIM = "dim"
TEXT_HASH = "text_hash"
SOURCE_VERSION = "source_version"
EMBEDDED_AT = "embedded_at"

# Inside a micro-batch.
TEXT = "_text"
OP = "_op"
BATCH_SOURCE_VERSION = "_source_version"
BATCH_TEXT_HASH = "_text_hash"
PROBLEM = "_problem"
KEY_JSON = "_key_json"
IS_DUPLICATE = "_duplicate"
ERROR_CODE = "_error_code"
ERROR_MESSAGE = "_error_message"
# What the model did for one Arrow batch, set on the batch's first row only (see udf.py).
ENCODE_STATS = "_encode_stats"
# Its fields and their Spark SQL types.
ENCODE_STATS_FIELDS = (
    ("tokens", "bigint"),
    ("padded_tokens", "bigint"),
    ("gpu_memory_bytes", "bigint"),
    ("device", "string"),
    ("dtype", "string"),
)

UPSERT = "upsert"
DELETE = "delete"
