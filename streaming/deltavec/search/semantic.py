"""Text in, nearest target rows out: the query side of deltavec, without Spark.

``open_search`` reads what the target says about itself (the model name, the
window, precision and query prompt, the source path and template the job wrote as
table properties), loads that model, checks that its weights are the ones the vectors
came from, and answers text queries with keys, scores and, when asked, the
source rows behind them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.errors import ModelError, SearchError
from deltavec.search.index import Hit, VectorIndex
from deltavec.search.refresh import RefreshReport
from deltavec.search.source_table import matching_keys, open_source, render, rows_for
from deltavec.sink.target import (
    MODEL_NAME_PROPERTY,
    MODEL_REVISION_PROPERTY,
    QUERY_PROMPT_PROPERTY,
    SOURCE_PROPERTY,
    TEMPLATE_PROPERTY,
    recorded_settings,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from deltavec.embed.encoder import Encoder

log = logging.getLogger(__name__)


class SemanticSearch:
    """A target's vectors, the model that made them, and optionally its source table.

    Build it with ``open_search``; share one per process (the model and the
    matrix are the expensive parts) and call ``refresh`` to follow the job.
    """

    def __init__(
        self,
        index: VectorIndex,
        encoder: Encoder,
        *,
        source_path: str | None = None,
        template: str | None = None,
        storage_options: dict[str, str] | None = None,
        query_prompt: str = "",
    ) -> None:
        self.index = index
        self.encoder = encoder
        self.query_prompt = query_prompt
        self.source_path = source_path
        self.template = template
        self._storage_options = storage_options
        self._source: DeltaTable | None = None

    @property
    def source(self) -> DeltaTable:
        """The source table, opened on first use (filters and hit columns need it)."""
        if self._source is None:
            if not self.source_path:
                raise SearchError(
                    f"target {self.index.path} does not record its source table; "
                    "pass the source path (--source, or --config with source.path)"
                )
            self._source = open_source(self.source_path, self._storage_options)
        return self._source

    def embed(self, text: str) -> np.ndarray:
        """The query's vector: the target's model and window, with its query prompt."""
        vector: np.ndarray = self.embed_many([text])[0]
        return vector

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model reads for these queries: prompt and special tokens
        included, each text cut at the window (what OpenAI-style usage reports)."""
        window = self.encoder.max_tokens
        ids = self.encoder.tokenizer([self.query_prompt + t for t in texts])["input_ids"]
        return sum(min(len(i), window) for i in ids)

    def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors for several texts in one encode call, (len(texts), dim) float32."""
        vectors, _ = self.encoder.encode(list(texts), prompt=self.query_prompt)
        return np.asarray(vectors, dtype=np.float32)

    def search(
        self,
        text: str,
        k: int = 10,
        *,
        where: str | None = None,
        columns: list[str] | None = None,
        with_text: bool = False,
    ) -> list[Hit]:
        """The k target rows nearest to ``text``, best first.

        Args:
            text: the query.
            k: hits wanted.
            where: a SQL predicate on source columns (``year >= 2020``); only rows
                that satisfy it compete, so k hits come back whenever k rows match.
            columns: source columns to attach to each hit (``Hit.source``).
            with_text: attach the text the model saw, rendered from the template.

        Raises:
            SearchError: a bad filter, or a source the target does not name.
        """
        rows = None
        if where:
            self.source.update_incremental()
            allowed = matching_keys(self.source, self.index.keys, where)
            rows = self.index.slots_of(allowed)
        hits = self.index.search(self.embed(text), k, rows=rows)
        wanted = list(columns or [])
        if with_text:
            wanted += self.template_columns
        if not wanted or not hits:
            return hits
        return self._attach(hits, wanted, columns or [], with_text)

    @property
    def template_columns(self) -> list[str]:
        from deltavec.config import template_columns

        if not self.template:
            raise SearchError(
                f"target {self.index.path} does not record its template; pass it (--config)"
            )
        return template_columns(self.template)

    def _attach(
        self, hits: list[Hit], wanted: list[str], columns: list[str], with_text: bool
    ) -> list[Hit]:
        import pyarrow as pa

        keys = self.index.keys
        table = pa.Table.from_pylist([h.key for h in hits])
        if self._source is not None:
            self._source.update_incremental()
        found = rows_for(self.source, table, wanted)
        out = []
        for hit in hits:
            row = found.get(tuple(hit.key[k] for k in keys))
            source = {c: row.get(c) for c in columns} if row is not None and columns else None
            text = render(self.template or "", row) if with_text and row is not None else None
            out.append(Hit(key=hit.key, score=hit.score, source=source, text=text))
        return out

    def refresh(self) -> RefreshReport:
        """Follow the target's new commits (see ``VectorIndex.refresh``).

        Raises:
            ModelChangedError: the target's vectors now come from another model
                (a reembed); this object keeps answering from the old version
                with the old model. Open the target again for the new one.
        """
        return self.index.refresh()


def open_search(
    path: str,
    *,
    storage_options: dict[str, str] | None = None,
    model: str | None = None,
    revision: str | None = None,
    source: str | None = None,
    template: str | None = None,
    device: str = "cpu",
    max_tokens: int | None = None,
    query_prompt: str | None = None,
) -> SemanticSearch:
    """Open a target for text search.

    Args:
        path: the target table's path.
        storage_options: cloud credentials and settings, for target and source.
        model: the model to load; default: the one the target names. A local copy
            of the same weights works: the weights are checked, not the name.
        revision: Hugging Face revision of ``model``.
        source: the source table's path; default: the one the target names.
        template: the job's text template; default: the one the target names.
        device: where the query model runs ("cpu", "cuda", "auto").
        max_tokens: tokens kept per query; default: the target's window.
        query_prompt: text put before each query; default: the one the target
            names, else the model's ``query`` prompt.

    Raises:
        TargetError: the target cannot be read.
        ModelError: the model cannot be loaded or is not the one the vectors came from.
    """
    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.models import resolve_model
    from deltavec.embed.udf import get_encoder

    index = VectorIndex(path, storage_options=storage_options)
    properties = index.properties
    name = model or properties.get(MODEL_NAME_PROPERTY) or _name_from_identity(index)
    revision = revision or properties.get(MODEL_REVISION_PROPERTY)
    resolved = resolve_model(name, revision)
    check_model(index, name, resolved, revision)
    # The window and long-text handling the documents were embedded with.
    settings = recorded_settings(properties)
    long_text = str(settings.get("long_text") or "truncate")
    # Queries are embedded with the precision the documents were: an int8 target's
    # vectors come from the quantized model, which runs on a CPU.
    int8 = settings.get("precision") == "int8"
    encoder = get_encoder(
        EncoderSpec(
            model=resolved,
            revision=revision,
            device="cpu" if int8 and device == "auto" else device,
            precision="int8" if int8 else "auto",
            max_tokens=max_tokens or settings.get("max_tokens"),
            long_text=long_text,
            chunk_overlap=int(settings.get("chunk_overlap") or 32),
            max_chunks=int(settings.get("max_chunks") or 32),
        )
    )
    if query_prompt is None:
        query_prompt = properties.get(QUERY_PROMPT_PROPERTY)
    if query_prompt is None:
        from deltavec.embed.models import query_prompt as model_query_prompt

        query_prompt = model_query_prompt(None, encoder.prompts)
    if index.dim and encoder.dim != index.dim:
        raise ModelError(
            f"model {name} makes {encoder.dim}-dimensional vectors; target {path} holds "
            f"{index.dim}-dimensional ones"
        )
    return SemanticSearch(
        index,
        encoder,
        source_path=source or properties.get(SOURCE_PROPERTY),
        template=template or properties.get(TEMPLATE_PROPERTY),
        storage_options=storage_options,
        query_prompt=query_prompt,
    )


def check_model(index: VectorIndex, name: str, resolved: str, revision: str | None) -> None:
    """Raise unless the weights at ``resolved`` are the ones the target's vectors came from.

    The identity is ``<label>@<sha256 prefix of the weights>``; only the digest
    is compared, so a local copy of the same weights is accepted under any name.

    Raises:
        ModelError: other weights (another model, a fine-tune, another revision).
    """
    from deltavec.embed.models import model_identity

    recorded = index.model_identity
    if not recorded:
        raise ModelError(
            f"target {index.path} does not record its model (table property deltavec.model)"
        )
    loaded = model_identity(name, resolved, revision)
    if _digest(loaded) != _digest(recorded):
        raise ModelError(
            f"model {loaded} is not the model target {index.path} was embedded with "
            f"({recorded}); its vectors would not be comparable"
        )


def _digest(identity: str) -> str:
    """The weights digest of an identity (``<model>@<digest>[#<settings>]``)."""
    from deltavec.embed.models import weights_of

    return weights_of(identity).rpartition("@")[2]


def _name_from_identity(index: VectorIndex) -> str:
    """The model to load for a target written before deltavec.model_name existed."""
    from deltavec.config import DEFAULT_MODEL
    from deltavec.embed.models import DEFAULT_MODEL_ID

    label = index.model_identity.partition("#")[0].rpartition("@")[0]
    if not label:
        raise ModelError(
            f"target {index.path} does not record its model (table property deltavec.model)"
        )
    return DEFAULT_MODEL if label == DEFAULT_MODEL_ID else label


def hits_as_dicts(hits: list[Hit]) -> list[dict[str, Any]]:
    """Hits as plain JSON-ready dicts, rank first."""
    out = []
    for rank, hit in enumerate(hits, 1):
        item: dict[str, Any] = {"rank": rank, "score": round(hit.score, 6), "key": hit.key}
        if hit.text is not None:
            item["text"] = hit.text
        if hit.source is not None:
            item["source"] = hit.source
        out.append(item)
    return out
