"""Reciprocal rank fusion: one ranking from the vector and the keyword rankings.

RRF (Cormack, Clarke and Buettcher, SIGIR 2009) scores a document by the sum of
1 / (K + rank) over the rankings it appears in. It needs no score calibration
(cosine similarities and BM25 scores live on unrelated scales), which is why
Elasticsearch, OpenSearch, Weaviate and Databricks Vector Search fuse this way.
"""

from __future__ import annotations

from collections.abc import Sequence

# The constant from the paper; every engine above uses 60 as its default too.
RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int) -> list[tuple[str, float]]:
    """The k best ids of the fused rankings, best first, with their RRF scores.

    Ties keep the order of first appearance (vector ranking first), so the
    result is reproducible.
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(scores.items(), key=lambda pair: -pair[1])
    return order[:k]
