"""The source table as a search consumer reads it: filters and the columns of the hits.

Both go through ``DeltaTable.scan``, delta-rs's own DataFusion reader: it prunes
files by their statistics, and it applies deletion vectors (which Databricks
enables on new tables by default), where the pyarrow dataset path refuses them.

Filters are DataFusion SQL predicates (``year >= 2020 AND field = 'biology'``),
parsed as one expression and evaluated by the engine over the source table alone:
no Python is evaluated, and a filter can neither write nor read anything else.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from deltavec.errors import SearchError

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable

# Above this many hits, one scan of the key columns beats a long OR predicate.
_MAX_PREDICATE_KEYS = 1000


def open_source(path: str, storage_options: dict[str, str] | None = None) -> DeltaTable:
    """The source Delta table at ``path``.

    Raises:
        SearchError: nothing at ``path`` is a Delta table.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        return DeltaTable(path, storage_options=storage_options)
    except DeltaError as exc:
        raise SearchError(f"source table {path} cannot be opened: {_first_line(exc)}") from None


def matching_keys(source: DeltaTable, keys: list[str], where: str) -> pa.Table:
    """The key columns of the source rows that satisfy ``where``.

    Raises:
        SearchError: the filter does not parse or names a column the source lacks.
    """
    if not where.strip():
        raise SearchError("the filter is empty")
    return _scan(source, keys, where, what=f"filter {where!r}")


def rows_for(
    source: DeltaTable, keys: pa.Table, columns: list[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Source rows (``columns`` plus the keys) for the given keys, by key tuple."""
    import pyarrow.compute as pc

    names = keys.column_names
    wanted = list(dict.fromkeys([*names, *columns]))
    if keys.num_rows == 0:
        return {}
    predicate = _keys_predicate(keys)
    found = _scan(source, wanted, predicate, what="reading the hits' rows")
    if predicate is None:
        mask = None
        for name in names:
            hit = pc.is_in(found.column(name), value_set=keys.column(name).combine_chunks())
            mask = hit if mask is None else pc.and_(mask, hit)
        found = found.filter(mask) if mask is not None else found
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in found.to_pylist():
        rows.setdefault(tuple(row[k] for k in names), row)
    return rows


def render(template: str, row: dict[str, Any]) -> str:
    """The template filled from one source row, as the job renders it (null -> empty)."""
    parts: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if field is not None:
            value = row.get(field)
            parts.append("" if value is None else str(value))
    return "".join(parts)


def _scan(source: DeltaTable, columns: list[str], predicate: str | None, *, what: str) -> pa.Table:
    import pyarrow as pa
    from deltalake.exceptions import DeltaError

    try:
        reader = source.scan(columns=columns, predicate=predicate)
        table = pa.RecordBatchReader.from_stream(reader).read_all()
    except (DeltaError, pa.ArrowException) as exc:
        raise SearchError(f"{what} fails on source {source.table_uri}: {_one_line(exc)}") from None
    return _without_view_types(table)


def _without_view_types(table: pa.Table) -> pa.Table:
    """DataFusion's string_view/binary_view columns as plain ones.

    Several pyarrow kernels (``filter``/``take`` among them, which ``rows_for``
    uses past ``_MAX_PREDICATE_KEYS`` keys) have no view-type implementation.
    """
    import pyarrow as pa

    plain = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}
    if not any(field.type in plain for field in table.schema):
        return table
    schema = pa.schema([f.with_type(plain.get(f.type, f.type)) for f in table.schema])
    return table.cast(schema)


def _keys_predicate(keys: pa.Table) -> str | None:
    """``k IN (...)`` (or an OR of ANDs for several key columns); None if not expressible."""
    import pyarrow as pa

    if keys.num_rows > _MAX_PREDICATE_KEYS:
        return None
    for field in keys.schema:
        if not (pa.types.is_integer(field.type) or pa.types.is_string(field.type)):
            return None
    columns = {name: keys.column(name).to_pylist() for name in keys.column_names}
    if len(columns) == 1:
        ((name, values),) = columns.items()
        return f"{_ident(name)} IN ({', '.join(_literal(v) for v in values)})"
    clauses = []
    for i in range(keys.num_rows):
        terms = [f"{_ident(name)} = {_literal(values[i])}" for name, values in columns.items()]
        clauses.append("(" + " AND ".join(terms) + ")")
    return " OR ".join(clauses)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """DataFusion's message (which names the valid columns on its second line) as one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines).removeprefix("Generic DeltaTable error: ")
    return text[:400] or type(exc).__name__
