"""``deltavec serve``: flags and config turned into ``ServeOptions``, then serve."""

from __future__ import annotations

import argparse
import os

from deltavec.serve.app import ServeLimits
from deltavec.serve.server import ServeOptions, serve


def run_serve(args: argparse.Namespace) -> int:
    """Serve the target named by --table (or the config) until interrupted; exit code 0."""
    from deltavec.config import ServeConfig, load_config
    from deltavec.search.cli import _storage_options, _target_and_defaults

    table, defaults = _target_and_defaults(args)
    settings = ServeConfig()
    if args.config or not args.table:
        path = args.config or os.environ.get("DELTAVEC_CONFIG", "conf/deltavec.toml")
        settings = load_config(path).serve
    open_options = {
        "storage_options": _storage_options(args.storage_option),
        "model": args.model or defaults.get("model"),
        "revision": defaults.get("revision") if not args.model else None,
        "source": args.source or defaults.get("source"),
        "template": defaults.get("template"),
        "max_tokens": defaults.get("max_tokens"),
    }
    serve(
        ServeOptions(
            table=table,
            host=args.host or settings.host,
            port=settings.port if args.port is None else args.port,
            refresh_seconds=args.refresh_seconds or settings.refresh_seconds,
            index=args.index or settings.index,
            nprobe=args.nprobe or settings.nprobe or None,
            query_runtime=args.query_runtime or settings.query_runtime,
            token_env=settings.token_env,
            limits=ServeLimits(
                max_k=settings.max_k,
                max_texts=settings.max_texts,
                max_body_bytes=settings.max_body_bytes,
            ),
            open_options=tuple(open_options.items()),
        )
    )
    return 0
