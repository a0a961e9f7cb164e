"""Nearest-neighbour search over a deltavec target, without Spark or a JVM.

``open_search(path)`` gives text search with the target's own model; ``VectorIndex``
is the vectors alone, for callers that embed their queries themselves.
"""

from __future__ import annotations

from deltavec.search.index import Hit, VectorIndex
from deltavec.search.refresh import RefreshReport
from deltavec.search.semantic import SemanticSearch, open_search

__all__ = ["Hit", "RefreshReport", "SemanticSearch", "VectorIndex", "open_search"]
