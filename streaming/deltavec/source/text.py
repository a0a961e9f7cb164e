"""The text the model sees: a template over source columns, rendered and hashed in Spark.

Rendering in the JVM keeps the Python workers for the model alone and lets the
sink compare ``text_hash`` against the target before any row reaches the model.

Values that are not strings are converted with Spark's ``CAST(... AS STRING)``:
``42`` becomes ``"42"``, an array ``[1, 2]`` becomes ``"[1, 2]"`` and a struct
``{a: 1, b: "x"}`` becomes ``"{1, x}"``. A null column renders as the empty string.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column


def render(template: str) -> Column:
    """A string column with every ``{column}`` of the template filled in."""
    from pyspark.sql import functions as F

    parts: list[Column] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(F.lit(literal))
        if field is not None:
            parts.append(F.coalesce(F.col(field).cast("string"), F.lit("")))
    return F.concat(*parts) if len(parts) > 1 else parts[0]


def is_blank(columns: list[str]) -> Column:
    """True when every column the template reads is null, empty or whitespace only.

    The template's literal parts ("[SEP]") do not count as text.
    """
    from pyspark.sql import functions as F

    # Java's \s alone misses Unicode spaces such as U+00A0 and U+3000.
    blanks = [
        F.coalesce(
            F.length(F.regexp_replace(F.col(c).cast("string"), r"[\s\p{Z}]+", "")) == 0,
            F.lit(True),
        )
        for c in columns
    ]
    result = blanks[0]
    for blank in blanks[1:]:
        result = result & blank
    return result


def text_hash(text: Column) -> Column:
    """SHA-256 of the rendered text, hex; equal hashes mean the vector would not change."""
    from pyspark.sql import functions as F

    return F.sha2(text, 256)
