"""``deltavec search``: a text query against a target, printed as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from deltavec.errors import SearchError
from deltavec.search.index import Hit
from deltavec.search.semantic import SemanticSearch, hits_as_dicts, open_search

_MIN_TEXT_WIDTH = 20


def run_search(args: argparse.Namespace) -> int:
    """Open the target named by the flags (or the config), search, print; exit code 0."""
    if args.k < 1:
        raise SearchError(f"-k must be at least 1 (got {args.k})")
    table, defaults = _target_and_defaults(args)
    search = open_search(
        table,
        storage_options=_storage_options(args.storage_option),
        model=args.model or defaults.get("model"),
        revision=defaults.get("revision") if not args.model else None,
        source=args.source or defaults.get("source"),
        template=defaults.get("template"),
        max_tokens=defaults.get("max_tokens"),
        query_prompt=defaults.get("query_prompt"),
    )
    with_text = bool(search.source_path and search.template)
    hits = search.search(args.text, args.k, where=args.where, with_text=with_text)
    if args.json:
        print(json.dumps(_as_json(search, args, hits), default=str))
    else:
        _print_table(search, args, hits, with_text)
    return 0


def _target_and_defaults(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The target path, and what the config says about model, source and template."""
    if args.table and not args.config:
        return args.table, {}
    from deltavec.config import load_config

    config = load_config(args.config or os.environ.get("DELTAVEC_CONFIG", "conf/deltavec.toml"))
    table = args.table or config.target.path
    if not table:
        raise SearchError(
            f"target {config.target.table} is a catalog table; deltavec search reads "
            "tables by path: pass --table with its storage path"
        )
    return table, {
        "model": config.model.name,
        "revision": config.model.revision,
        "max_tokens": config.model.max_tokens,
        "query_prompt": config.model.query_prompt,
        "source": config.source.path,
        "template": config.source.template,
    }


def _storage_options(pairs: list[str]) -> dict[str, str] | None:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SearchError(f"--storage-option takes KEY=VALUE (got {pair!r})")
        options[key] = value
    return options or None


def _as_json(search: SemanticSearch, args: argparse.Namespace, hits: list[Hit]) -> dict[str, Any]:
    index = search.index
    return {
        "query": args.text,
        "where": args.where,
        "table": index.path,
        "version": index.version,
        "rows": len(index),
        "model": index.model_identity,
        "hits": hits_as_dicts(hits),
    }


def _print_table(
    search: SemanticSearch, args: argparse.Namespace, hits: list[Hit], with_text: bool
) -> None:
    index = search.index
    where = f" where {args.where}" if args.where else ""
    print(
        f"{len(hits)} nearest to {args.text!r}{where} in {index.path} "
        f"(version {index.version}, {len(index)} rows, {index.model_identity})"
    )
    if not hits:
        return
    keys = index.keys
    header = ["rank", "score", *keys]
    rows = [
        [str(rank), f"{hit.score:.4f}", *(str(hit.key[k]) for k in keys)]
        for rank, hit in enumerate(hits, 1)
    ]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    room = shutil.get_terminal_size((120, 24)).columns - sum(w + 2 for w in widths)
    room = max(room, _MIN_TEXT_WIDTH)
    for cells, hit in zip([header, *rows], [None, *hits], strict=True):
        line = "  ".join(
            c.rjust(w) if i < 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        if with_text:
            text = "text" if hit is None else _one_line(hit.text, room)
            line += "  " + text
        print(line.rstrip())
    if not with_text:
        print("(no source text: the target names no source; pass --source or --config)")


def _one_line(text: str | None, width: int) -> str:
    if text is None:
        return "(row no longer in the source)"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
