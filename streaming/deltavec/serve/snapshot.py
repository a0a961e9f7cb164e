"""What the server answers from: one immutable ``Snapshot``, replaced whole by the refresher.

A snapshot holds one version of the vectors (an ``IndexView``, and for a
large target an ``IvfView``, the approximate index of that version), the
keyword index committed for that version, and the ``SemanticSearch`` whose
encoder made the query side of those vectors. A query reads
``ServedTarget.current`` once and uses only that object, so its vector ranking,
keyword ranking and query vector all come from one version and one model,
whatever the refresher does meanwhile.

The refresher follows the target's commits (``SemanticSearch.refresh``), turns
what changed between two versions into keyword-index updates (rows of new
files; keys gone), and swaps in the next snapshot with one assignment. A model
change (``deltavec reembed``) makes the index refuse to refresh; the refresher
then opens the target again, model included, and rebuilds the keyword index
before the swap: no query ever pairs one model's query vector with another's rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from deltavec.errors import DeltavecError, ModelChangedError
from deltavec.search.source_table import matching_keys, render, rows_for
from deltavec.search.state import text_fingerprints
from deltavec.serve.batcher import QueryBatcher
from deltavec.serve.keywords import KeywordIndex, KeywordView, key_id

if TYPE_CHECKING:
    import pyarrow as pa

    from deltavec.embed.encoder import Encoder
    from deltavec.search.approximate import IvfView
    from deltavec.search.index import IndexView, Ranker, Slots
    from deltavec.search.semantic import SemanticSearch
    from deltavec.serve.collector import LoadedObjectFreezer

log = logging.getLogger(__name__)

_ORIGIN = "__origin"
# serve.index = "auto": an approximate index from this many live rows. Below,
# an exact pass is cheap (a batch of queries over 100,000 x 384 floats took
# 22-27 ms in the server, half that here) and a second copy of the vectors is not.
AUTO_APPROXIMATE_ROWS = 50_000
INDEX_MODES = ("auto", "exact", "approximate")
QUERY_RUNTIMES = ("auto", "torch", "onnx")
# Filters remembered per snapshot (each holds up to one int64 per row).
_CACHED_FILTERS = 32

K = TypeVar("K")
V = TypeVar("V")


class _Memo(Generic[K, V]):
    """A bounded cache (oldest out first) in which concurrent misses of one key compute it once.

    Web clients repeat a few filters: after a server starts, 16 clients asking
    for the same filter at once would otherwise scan the source 16 times side by side.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._done: dict[K, V] = {}
        self._running: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._done:
                return self._done[key]
            running = self._running.get(key)
            mine = running is None
            if running is None:
                running = self._running[key] = Future()
        if not mine:
            return running.result()
        try:
            value = compute()
        except BaseException as exc:  # every waiter gets the failure, and the next call tries again
            with self._lock:
                del self._running[key]
            running.set_exception(exc)
            raise
        with self._lock:
            while len(self._done) >= self._size:
                self._done.pop(next(iter(self._done)))
            self._done[key] = value
            del self._running[key]
        running.set_result(value)
        return value

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._done.items())


@dataclass(frozen=True)
class Snapshot:
    """One version of everything a query reads. Never changed once published."""

    search: SemanticSearch
    view: IndexView
    keywords: KeywordView | None  # None: the target names no source or template
    model: str
    batcher: QueryBatcher  # the model's; concurrent queries share its encode calls
    approximate: IvfView | None = None  # this version's FAISS index, when served approximately
    # Filter -> slots, per source version: web clients repeat a few filters, and
    # each costs a scan of the source and a join with the keys.
    _filters: _Memo[tuple[str, int], Slots] = field(
        default_factory=lambda: _Memo(_CACHED_FILTERS), compare=False
    )
    # id(slots) -> (slots, their key ids); the slots are kept so the id is not reused.
    _keyword_keys: _Memo[int, tuple[Slots, list[str]]] = field(
        default_factory=lambda: _Memo(_CACHED_FILTERS), compare=False
    )

    @property
    def version(self) -> int:
        return self.view.version

    @property
    def ranker(self) -> Ranker:
        """What ranks this snapshot's vector queries: its approximate index, if any."""
        return self.approximate if self.approximate is not None else self.view

    def slots_where(self, where: str) -> Slots:
        """The slots of this version's rows whose source row satisfies ``where``.

        Raises:
            SearchError: the filter does not parse or names a column the source lacks.
        """
        source = self.search.source
        return self._filters.get(
            (where, int(source.version())),
            lambda: self.view.slots_of(matching_keys(source, self.view.key_names, where)),
        )

    def keyword_keys(self, rows: Slots) -> list[str]:
        """The key ids (as the keyword index names them) of a filter's ``rows``.

        Cached beside the filter's slots (``rows`` is the object ``slots_where``
        cached): a filtered keyword or hybrid query would otherwise turn every
        matching row's key into a Python string each time.
        """
        from deltavec.serve.keywords import key_id

        def ids() -> tuple[Slots, list[str]]:
            names = self.view.key_names
            allowed = self.view.state.keys().take(rows.slots).select(names).to_pylist()
            return rows, [key_id([row[n] for n in names]) for row in allowed]

        return self._keyword_keys.get(id(rows), ids)[1]

    def warm_filters(self, previous: Snapshot) -> None:
        """Evaluate, for this snapshot, the filters ``previous`` has answered.

        The refresher calls this before the swap: the first filtered queries
        after it then find their rows cached, instead of each scanning the source.
        A filter that fails here is left for its next query to report.
        """
        with_keywords = {key for key, _ in previous._keyword_keys.items()}
        # Newest source version last, so each filter's latest rows decide.
        latest = {where: rows for (where, _), rows in previous._filters.items()}
        for where, rows in latest.items():
            try:
                slots = self.slots_where(where)
                if id(rows) in with_keywords:
                    self.keyword_keys(slots)
            except Exception as exc:  # noqa: BLE001 (the query that asks again reports it)
                log.debug("filter %r not prepared for version %d: %s", where, self.version, exc)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Query vectors from this snapshot's model (and its query prompt)."""
        return self.batcher.embed(texts)


@dataclass(frozen=True)
class RefreshOutcome:
    version: int
    changed: bool
    reopened: bool
    keyword_updates: int
    seconds: float


class ServedTarget:
    """The target as the server sees it: the current snapshot and how to make the next.

    Args:
        open_target: opens the target for search (``open_search`` with the
            server's options); called again when the target changes model.
        index: ``"exact"``, ``"approximate"`` (FAISS IVF, per snapshot) or
            ``"auto"`` (approximate from ``AUTO_APPROXIMATE_ROWS`` live rows
            when FAISS is installed).
        nprobe: clusters an approximate query visits (None: 1/16 of them).
        query_runtime: what runs the model's transformer for query vectors on a
            CPU: ``"onnx"`` (ONNX Runtime, ``deltavec.embed.onnx_queries``; the
            server does not start without it), ``"torch"``, or ``"auto"`` (onnx
            when its export gives torch's vectors, torch otherwise).
        freezer: keeps what is loaded out of the process's full garbage
            collections (``deltavec.serve.collector``); None leaves them alone.
    """

    def __init__(
        self,
        open_target: Callable[[], SemanticSearch],
        *,
        index: str = "auto",
        nprobe: int | None = None,
        query_runtime: str = "auto",
        freezer: LoadedObjectFreezer | None = None,
    ) -> None:
        if index not in INDEX_MODES:
            raise ValueError(f"index must be one of {', '.join(INDEX_MODES)} (got {index!r})")
        if query_runtime not in QUERY_RUNTIMES:
            raise ValueError(
                f"query_runtime must be one of {', '.join(QUERY_RUNTIMES)} (got {query_runtime!r})"
            )
        self._query_runtime = query_runtime
        if index == "approximate":
            from deltavec.search.approximate import require_faiss

            require_faiss()  # fail at start, saying how to install it
        self._index = index
        self._nprobe = nprobe
        self._open = open_target
        self._refreshing = threading.Lock()
        self.refreshed_at = time.time()
        self.current = self._build(open_target())
        self._freezer = freezer
        if freezer is not None:
            freezer.loaded()

    def _build(self, search: SemanticSearch) -> Snapshot:
        # Before the snapshot exists, so no query ever sees the encoder change.
        search.encoder = self._query_encoder(search)
        keywords = KeywordIndex() if search.source_path and search.template else None
        self._keyword_index = keywords
        view = search.index.view()
        keyword_view = None
        if keywords is not None:
            texts, self._unrendered = _texts(search, _keys_of(view))
            self._unrendered_at = search.source.version()
            keyword_view = keywords.apply(texts, ())
        batcher = QueryBatcher(search.embed_many)
        # Ranked exactly until ``complete`` adds the approximate index: the server
        # answers from the moment the vectors are loaded.
        return Snapshot(search, view, keyword_view, search.index.model_identity, batcher)

    def _query_encoder(self, search: SemanticSearch) -> Encoder:
        """The encoder the server's query vectors come from: the target's, on
        ONNX Runtime when ``query_runtime`` asks for it and it checks out."""
        encoder = search.encoder
        if self._query_runtime == "torch":
            return encoder
        from deltavec.embed.onnx_queries import OnnxUnavailable, onnx_query_encoder

        try:
            return onnx_query_encoder(encoder, prompt=search.query_prompt)
        except OnnxUnavailable as exc:
            if self._query_runtime == "onnx":
                raise
            log.info("query vectors on torch: %s", exc)
            return encoder

    def complete(self) -> bool:
        """Give the current snapshot the approximate index it wants and lacks.

        Built aside (2 s for 100,000 rows on the 2-core VM) and published as a
        snapshot of the same version; queries meanwhile are ranked exactly.
        Returns whether it published one.
        """
        with self._refreshing:
            return self._complete()

    def _complete(self) -> bool:
        old = self.current
        if old.approximate is not None:
            return False
        approximate = self._approximate(old.view, None)
        if approximate is None:
            return False
        self.current = replace(old, approximate=approximate)
        return True

    def _approximate(self, view: IndexView, previous: IvfView | None) -> IvfView | None:
        """The approximate index for ``view`` (from ``previous``'s when there is one), or None."""
        if not len(view) or not self._wants_approximate(len(view)):
            return None
        from deltavec.search.approximate import IvfView

        started = time.perf_counter()
        try:
            if previous is not None:
                return previous.follow(view, nprobe=self._nprobe)
            built = IvfView.build(view, nprobe=self._nprobe)
        except Exception as exc:  # ranked exactly; the next refresh tries again
            # A failed build must not stop the server following the table.
            log.warning(
                "no approximate index for version %d, ranking exactly: %s",
                view.version,
                exc,
                exc_info=True,
            )
            return None
        log.info(
            "approximate index of version %d: %d rows, %d clusters, %d probed, in %.1f s",
            view.version,
            len(view),
            built.ivf.index.nlist,
            built.ivf.nprobe,
            time.perf_counter() - started,
        )
        return built

    def _wants_approximate(self, rows: int) -> bool:
        if self._index != "auto":
            return self._index == "approximate"
        from deltavec.search.approximate import installed

        return rows >= AUTO_APPROXIMATE_ROWS and installed()

    def refresh(self) -> RefreshOutcome:
        """Follow the target's new commits and publish the next snapshot.

        Raises:
            DeltavecError: the target cannot be read now; the current snapshot
                stays in place and keeps answering.
        """
        with self._refreshing:
            started = time.time()
            old = self.current
            try:
                old.search.refresh()
            except ModelChangedError as exc:
                # The message, not the exception: a kept log record would keep
                # its traceback's frames, and with them the old model, alive.
                log.info("%s; loading the new model", str(exc))
                self.current = self._build(self._open())
                old.batcher.close()
                if self._freezer is not None:
                    self._freezer.model_replaced(old.search)
                self.refreshed_at = started
                keywords = self.current.keywords
                return RefreshOutcome(
                    self.current.version,
                    True,
                    True,
                    keywords.documents if keywords else 0,
                    time.time() - started,
                )
            if old.search.source_path:
                # Filters and hit columns read the source: follow it too.
                old.search.source.update_incremental()
            view = old.search.index.view()
            keyword_view, updates = old.keywords, 0
            if self._keyword_index is not None:
                keyword_view, updates = self._follow_keywords(old, view, self._keyword_index)
            # Compared with what the snapshot holds, not with what this refresh
            # read: a refresh that failed after the index moved on is completed here.
            if view is old.view and keyword_view is old.keywords:
                self._complete()  # after a model change, or a build that failed
                self.refreshed_at = started
                return RefreshOutcome(view.version, False, False, 0, time.time() - started)
            approximate = (
                old.approximate if view is old.view else self._approximate(view, old.approximate)
            )
            current = Snapshot(old.search, view, keyword_view, old.model, old.batcher, approximate)
            current.warm_filters(old)
            self.current = current
            self.refreshed_at = started
            return RefreshOutcome(view.version, True, False, updates, time.time() - started)

    def _follow_keywords(
        self, old: Snapshot, view: IndexView, keywords: KeywordIndex
    ) -> tuple[KeywordView | None, int]:
        """The keyword index for ``view``, and how many keys it rendered or dropped.

        Renders the text of rows that are new or have new text, drops keys gone
        from the target, and, once the source has moved on, renders again the
        keys whose source row was missing (the job had not caught up with a
        delete, or a row deleted and written back unchanged never reached the
        target): the text of a row whose hash stays the same is never read
        again, so without this their documents would stay missing.
        """
        pending = self._unrendered
        if view is old.view:
            upserted, deleted = pending.slice(0, 0), pending.slice(0, 0)
        else:
            upserted, deleted = changed_keys(old.view, view)
        names = view.key_names
        if deleted.num_rows:
            pending = pending.join(deleted, keys=names, join_type="left anti")
        source_version = old.search.source.version()
        if pending.num_rows and source_version != self._unrendered_at:
            others = pending.join(upserted, keys=names, join_type="left anti")
            upserted, pending = _concat_keys(upserted, others), pending.slice(0, 0)
        if not upserted.num_rows and not deleted.num_rows:
            self._unrendered = pending
            return old.keywords, 0
        pending = pending.join(upserted, keys=names, join_type="left anti")
        texts, missing = _texts(old.search, upserted)
        self._unrendered = _concat_keys(pending, missing)
        self._unrendered_at = source_version
        gone = [key_id(k.values()) for k in deleted.to_pylist()]
        return keywords.apply(texts, gone), len(texts) + len(gone)

    def run(self, every: float, stop: threading.Event, on_refresh: Callable[..., Any]) -> None:
        """Refresh every ``every`` seconds until ``stop`` is set; failures are logged, not fatal."""
        self.complete()
        while not stop.wait(every):
            try:
                outcome = self.refresh()
            except Exception as exc:  # the refresher must outlive any one failure
                log.warning(
                    "refresh failed, still serving version %d: %s",
                    self.current.version,
                    str(exc),  # not exc: see the model change in ``refresh``
                    exc_info=not isinstance(exc, DeltavecError),
                )
                on_refresh(None)
                continue
            on_refresh(outcome)
            if self._freezer is not None:
                self._freezer.refreshed()


def changed_keys(old: IndexView, new: IndexView) -> tuple[pa.Table, pa.Table]:
    """(keys whose row is new or has new text in ``new``, keys live in ``old`` but not in ``new``).

    A MERGE rewrites whole files, bringing their untouched rows along, and an
    OPTIMIZE rewrites every row; neither changes those rows' text. With the text
    hash the job records, a row counts as changed only when its hash did; a
    target without one falls back to (key, data file) pairs, and the keyword
    index then finds the text of a rewritten file's untouched rows unchanged.
    """
    keys = new.key_names
    texts_before, texts_after = text_fingerprints(old.state), text_fingerprints(new.state)
    if texts_before is None or texts_after is None:
        before, after = _keys_and(old, _files(old)), _keys_and(new, _files(new))
    else:
        before, after = _keys_and(old, texts_before), _keys_and(new, texts_after)
    upserted = after.join(before, keys=[*keys, _ORIGIN], join_type="left anti").select(keys)
    deleted = before.select(keys).join(after.select(keys), keys=keys, join_type="left anti")
    return upserted, deleted


def _files(view: IndexView) -> np.ndarray:
    blocks = view.state.blocks
    return np.concatenate([b.files for b in blocks]) if blocks else np.zeros(0, np.int32)


def _keys_and(view: IndexView, origin: np.ndarray) -> pa.Table:
    """Live keys, each with its slot's entry of ``origin`` (text fingerprint or file id)."""
    import pyarrow as pa

    live = view.live_keys()
    slots = live.column("__slot").to_numpy()
    return live.select(view.key_names).append_column(_ORIGIN, pa.array(origin[slots]))


def _keys_of(view: IndexView) -> pa.Table:
    return view.live_keys().select(view.key_names)


def _texts(search: SemanticSearch, keys: pa.Table) -> tuple[dict[str, str | None], pa.Table]:
    """key id -> the template rendered from the key's source row now (None: no row),
    and the keys that have no source row."""
    import pyarrow as pa

    if keys.num_rows == 0:
        return {}, keys
    names = keys.column_names
    columns = search.template_columns
    search.source.update_incremental()
    found = rows_for(search.source, keys, columns)
    out: dict[str, str | None] = {}
    missing = []
    for i, key in enumerate(keys.to_pylist()):
        values = tuple(key[n] for n in names)
        row = found.get(values)
        if row is None:
            missing.append(i)
        out[key_id(values)] = None if row is None else render(search.template or "", row)
    return out, keys.take(pa.array(missing, pa.int64()))


def _concat_keys(first: pa.Table, second: pa.Table) -> pa.Table:
    """Two key tables of one schema as one (either may be empty)."""
    import pyarrow as pa

    if not second.num_rows:
        return first
    if not first.num_rows:
        return second
    return pa.concat_tables([first, second])
