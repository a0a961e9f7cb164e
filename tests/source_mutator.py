"""A process that keeps changing a source table, as its real writers would.

Run as ``python -m tests.source_mutator SOURCE STOP_FILE LEDGER [SEED]``: until
STOP_FILE exists it commits, every second or two, one of: new rows, new
text for some rows, an edit of a column the template does not read, deletes, a
MERGE that updates some keys and inserts others, an UPDATE that changes a row's
key, two commits in a row that both rewrite one key (so one micro-batch can
read the key from two commits), a blanking of a row's text (the job quarantines
it) or new text for a blanked row (the job, or a ``quarantine retry``, embeds it
again). It writes through ``deltalake`` (no JVM), so the job under test is the only
Spark on the machine. At the end it writes LEDGER: the text every live key should
have and the keys left blank, kept independently of Delta.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pyarrow as pa

WORDS = [
    "vector",
    "index",
    "stream",
    "delta",
    "lake",
    "embedding",
    "model",
    "query",
    "batch",
    "table",
    "merge",
    "commit",
    "protein",
    "graph",
    "neural",
    "language",
    "retrieval",
    "latency",
    "cluster",
    "spark",
    "shard",
    "cache",
]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))


def create(source: str, rows: int, seed: int = 0) -> dict[int, str]:
    """The starting table (Change Data Feed on) and its ledger."""
    from deltalake import write_deltalake

    rng = random.Random(seed)
    titles = [_text(rng) for _ in range(rows)]
    abstracts = [_text(rng) for _ in range(rows)]
    write_deltalake(
        source,
        _table(list(range(rows)), titles, abstracts, [2000] * rows),
        configuration={"delta.enableChangeDataFeed": "true"},
    )
    return {i: f"{t} [SEP] {a}" for i, (t, a) in enumerate(zip(titles, abstracts, strict=True))}


def _table(ids: list[int], titles: list[str], abstracts: list[str], years: list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "abstract": pa.array(abstracts, pa.string()),
            "year": pa.array(years, pa.int32()),
        }
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def mutate(source: str, stop_file: Path, ledger_path: Path, seed: int) -> None:
    from deltalake import DeltaTable, write_deltalake

    rng = random.Random(seed)
    table = DeltaTable(source)
    live = {
        row["id"]: f"{row['title']} [SEP] {row['abstract']}"
        for row in table.to_pyarrow_table().to_pylist()
    }
    abstracts = {row["id"]: row["abstract"] for row in table.to_pyarrow_table().to_pylist()}
    next_id = max(live) + 1
    blank: set[int] = set()
    counts: dict[str, int] = {}
    while not stop_file.exists():
        table = DeltaTable(source)
        op = rng.choices(
            [
                "insert",
                "retext",
                "other_column",
                "delete",
                "merge",
                "rekey",
                "retext_twice",
                "blank",
                "unblank",
            ],
            # Fixes only while three keys are blank: some are left for the quarantine.
            [3, 3, 1, 2, 2, 1, 1, 1, 1 if len(blank) > 2 else 0],
        )[0]
        keys = rng.sample(sorted(live), min(len(live), rng.randint(1, 3)))
        if op == "blank":
            # Every column the template reads is null: quarantined as empty text.
            table.update(predicate=f"id = {keys[0]}", updates={"title": "NULL", "abstract": "NULL"})
            del live[keys[0]], abstracts[keys[0]]
            blank.add(keys[0])
        elif op == "unblank":
            key = rng.choice(sorted(blank))
            title, abstract = _text(rng), _text(rng)
            table.update(
                predicate=f"id = {key}",
                updates={"title": _quote(title), "abstract": _quote(abstract)},
            )
            blank.discard(key)
            live[key], abstracts[key] = f"{title} [SEP] {abstract}", abstract
        elif op == "insert":
            ids = list(range(next_id, next_id + rng.randint(1, 5)))
            next_id += len(ids)
            titles = [_text(rng) for _ in ids]
            abs_ = [_text(rng) for _ in ids]
            write_deltalake(source, _table(ids, titles, abs_, [2001] * len(ids)), mode="append")
            for i, t, a in zip(ids, titles, abs_, strict=True):
                live[i], abstracts[i] = f"{t} [SEP] {a}", a
        elif op == "retext":
            title = _text(rng)
            table.update(
                predicate=f"id IN ({', '.join(map(str, keys))})", updates={"title": _quote(title)}
            )
            for k in keys:
                live[k] = f"{title} [SEP] {abstracts[k]}"
        elif op == "other_column":
            table.update(
                predicate=f"id IN ({', '.join(map(str, keys))})",
                updates={"year": str(rng.randint(1990, 2030))},
            )
        elif op == "rekey":
            # The row keeps its text under a new key: the old key's vector must go.
            old, new = keys[0], next_id
            next_id += 1
            table.update(predicate=f"id = {old}", updates={"id": str(new)})
            live[new], abstracts[new] = live.pop(old), abstracts.pop(old)
        elif op == "retext_twice":
            for _ in range(2):
                title = _text(rng)
                DeltaTable(source).update(
                    predicate=f"id = {keys[0]}", updates={"title": _quote(title)}
                )
            live[keys[0]] = f"{title} [SEP] {abstracts[keys[0]]}"
        elif op == "delete":
            table.delete(f"id IN ({', '.join(map(str, keys))})")
            for k in keys:
                del live[k], abstracts[k]
        else:
            ids = keys + list(range(next_id, next_id + rng.randint(1, 3)))
            next_id = max(next_id, max(ids) + 1)
            titles = [_text(rng) for _ in ids]
            abs_ = [abstracts.get(i) or _text(rng) for i in ids]
            (
                table.merge(
                    _table(ids, titles, abs_, [2002] * len(ids)),
                    predicate="t.id = s.id",
                    source_alias="s",
                    target_alias="t",
                )
                .when_matched_update(updates={"title": "s.title"})
                .when_not_matched_insert_all()
                .execute()
            )
            for i, t, a in zip(ids, titles, abs_, strict=True):
                live[i], abstracts[i] = f"{t} [SEP] {a}", a
        counts[op] = counts.get(op, 0) + 1
        # About one commit every two seconds: a lively table, and a backlog the
        # job can drain between kills.
        time.sleep(rng.uniform(1.0, 3.0))
    ledger_path.write_text(json.dumps({"live": live, "blank": sorted(blank), "commits": counts}))


if __name__ == "__main__":
    mutate(
        sys.argv[1],
        Path(sys.argv[2]),
        Path(sys.argv[3]),
        int(sys.argv[4]) if len(sys.argv) > 4 else 0,
    )
