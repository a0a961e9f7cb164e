"""Structured log lines: ``event=<name> key=value ...`` (logfmt), one event per line.

Log shippers (Loki, Vector, Fluent Bit, Datadog) parse logfmt without a custom
pattern, and a person can still read it. Values are numbers, versions, ids and
short words: never a config dump, a credential or a row's text.
"""

from __future__ import annotations

import json


def kv(event: str, **fields: object) -> str:
    """One logfmt line: ``event=<event>`` then each field; floats get 3 decimals.

    None becomes an empty value (``source_version=``); a value with spaces, quotes
    or ``=`` is quoted as a JSON string.
    """
    parts = [f"event={_value(event)}"]
    for key, value in fields.items():
        parts.append(f"{key}={_value(value)}")
    return " ".join(parts)


def _value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if not text or any(c in text for c in ' "=\\\t\n'):
        return json.dumps(text)
    return text
