"""``deltavec``: the command line.

Heavy imports (Spark, torch) happen inside the commands, so ``deltavec --help``
answers at once. A ``DeltavecError`` prints as one line and exits 2; the stack
trace is shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from deltavec.errors import DeltavecError

log = logging.getLogger("deltavec")

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except DeltavecError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"deltavec: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltavec",
        description="Streaming embeddings for Delta Lake: source table -> model -> target table.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines and traces")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the streaming job")
    _config_arg(run)
    run.add_argument(
        "--once", action="store_true", help="process what the source holds now, then exit"
    )
    run.add_argument(
        "--master",
        default=None,
        help="Spark master, e.g. spark://host:7077 or k8s://https://host (overrides spark.master)",
    )
    run.set_defaults(command=cmd_run)

    quarantine = sub.add_parser("quarantine", help="show or re-queue rows that failed to embed")
    qsub = quarantine.add_subparsers(required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", help="quarantined rows, newest first, with counts by reason")
    _config_arg(qlist)
    qlist.add_argument("--reason", help="only rows with this reason code")
    qlist.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    qlist.add_argument("--json", action="store_true", help="one JSON object")
    qlist.set_defaults(command=cmd_quarantine_list)
    qretry = qsub.add_parser("retry", help="embed quarantined keys again from the current source")
    _config_arg(qretry)
    qretry.add_argument("--reason", help="only rows with this reason code")
    qretry.set_defaults(command=cmd_quarantine_retry)

    status = sub.add_parser(
        "status", help="show how far the job got: lag, table sizes, last batch (no job needed)"
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON, for scripts")
    status.set_defaults(command=cmd_status)

    reembed = sub.add_parser(
        "reembed",
        help="re-embed the target with another model or new model settings, switching "
        "consumers over at once",
    )
    _config_arg(reembed)
    reembed.add_argument(
        "--model",
        default=None,
        help='the new model: "default", a folder or a Hugging Face id (default: model.name '
        "of the config, whose other model settings, such as max_tokens, apply too)",
    )
    reembed.add_argument("--revision", default=None, help="Hugging Face revision of the model")
    reembed.add_argument(
        "--chunk-rows",
        type=int,
        default=5000,
        help="rows embedded per resumable step (default 5000)",
    )
    reembed.set_defaults(command=cmd_reembed)

    demo = sub.add_parser("demo", help="write a sample source table, embed it, search it")
    _config_arg(demo)
    demo.add_argument("--query", default=None, help="text to search the demo target for")
    demo.set_defaults(command=cmd_demo)

    search = sub.add_parser(
        "search",
        help="nearest target rows to a text, without Spark",
        description="Embed TEXT with the target's own model and print the nearest rows. "
        "The target names its model, source and template; --config or the flags "
        "below stand in for a target that does not.",
    )
    search.add_argument("text", help="what to search for")
    search.add_argument("-k", type=int, default=10, help="hits to show (default 10)")
    _target_args(
        search,
        config_names="the target and source",
        source_for="for --where and the text column",
    )
    search.add_argument("--where", help='SQL filter on source columns, e.g. "year >= 2020"')
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.set_defaults(command=cmd_search)

    serve = sub.add_parser(
        "serve",
        help="HTTP search service over a target: vector, keyword and hybrid search",
        description="Serve POST /search, POST /embed, POST /v1/embeddings, GET /healthz and "
        "GET /metrics over one target, following its commits in the background. Binds to "
        "127.0.0.1 unless told otherwise; another host needs a bearer token in "
        "$DELTAVEC_SERVE_TOKEN (serve.token_env).",
    )
    _target_args(
        serve,
        config_names="the target and its [serve] settings",
        source_for="for filters, columns and keywords",
    )
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080; 0: any free)")
    serve.add_argument(
        "--refresh-seconds",
        type=float,
        default=None,
        help="seconds between refreshes from the target's log (default 5)",
    )
    serve.add_argument(
        "--index",
        choices=("auto", "exact", "approximate"),
        default=None,
        help="rank vector queries exactly or with a FAISS IVF index (default auto: "
        "approximate from 50,000 rows)",
    )
    serve.add_argument(
        "--nprobe",
        type=_positive_int,
        default=None,
        help="clusters an approximate query visits (default 1/16 of them)",
    )
    serve.add_argument(
        "--query-runtime",
        choices=("auto", "torch", "onnx"),
        default=None,
        help="what runs the model for query vectors on a CPU (default auto: ONNX Runtime "
        "once it gives torch's vectors, else torch)",
    )
    serve.set_defaults(command=cmd_serve)
    return parser


def _target_args(parser: argparse.ArgumentParser, *, config_names: str, source_for: str) -> None:
    """The arguments of the commands that read a target without Spark (search, serve)."""
    parser.add_argument("--table", help="target table path (default: target.path of --config)")
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"TOML config naming {config_names} "
        "(default without --table: $DELTAVEC_CONFIG or conf/deltavec.toml)",
    )
    parser.add_argument("--source", help=f"source table path, {source_for}")
    parser.add_argument("--model", help="load this model copy (its weights must match)")
    parser.add_argument(
        "-o",
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="deltalake storage option for cloud paths (repeatable)",
    )


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("DELTAVEC_CONFIG", "conf/deltavec.toml"),
        help="TOML config file (default: $DELTAVEC_CONFIG or conf/deltavec.toml)",
    )


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from deltavec.commands.job import Job
    from deltavec.config import load_config

    overrides = {"spark": {"master": args.master}} if args.master else None
    config = load_config(args.config, overrides)
    # --once drains a backlog that may take hours: show how far it got.
    summary = Job(config).run(once=args.once, progress=args.once)
    print(
        json.dumps(
            {
                "batches": summary.batches,
                "rows_read": summary.rows_read,
                "embedded": summary.embedded,
                "unchanged": summary.unchanged,
                "deleted": summary.deleted,
                "quarantined": summary.quarantined,
                "skipped_change_commits": summary.skipped_change_commits,
                "seconds": round(summary.seconds, 1),
            }
        )
    )
    return 0


def _job(args: argparse.Namespace) -> Any:
    from deltavec.commands.job import Job
    from deltavec.config import load_config

    return Job(load_config(args.config))


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from deltavec.commands import quarantine

    job = _job(args)
    rows = quarantine.list_rows(job, reason=args.reason, limit=args.limit)
    counts = quarantine.counts_by_reason(job)
    if args.json:
        print(json.dumps({"counts": counts, "rows": rows}, default=str))
        return 0
    print(f"quarantine {job.config.target.quarantine.name}: {sum(counts.values())} rows")
    for reason, count in sorted(counts.items()):
        print(f"  {reason:<16} {count}")
    for row in rows:
        value = (row["value"] or "").replace("\n", " ")
        print(
            f"{row['quarantined_at']:%Y-%m-%d %H:%M:%S}  {row['reason']:<14} key={row['key']} "
            f"v{row['source_version']}  {row['message']}  [{row['value_length']} chars] "
            f"{value[:60]!r}"
        )
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from deltavec.commands import quarantine

    report = quarantine.retry(_job(args), reason=args.reason)
    print(json.dumps(asdict(report)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deltavec.commands.status import format_status, job_status
    from deltavec.config import load_config
    from deltavec.runtime.session import build_session

    config = load_config(args.config)
    spark_cfg = config.spark
    # A local session is enough to read logs and checkpoints, and never queues
    # behind the job on its cluster; it takes the config's settings for storage
    # credentials and catalogs.
    spark = build_session(
        master="local[1]" if spark_cfg.master is not None else None,
        app_name=f"{spark_cfg.app_name}-status",
        conf={"spark.ui.enabled": "false", **spark_cfg.conf},
        class_archive=spark_cfg.class_archive,
    )
    status = job_status(spark, config)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    from deltavec.commands.reembed import Reembed
    from deltavec.config import load_config

    config = load_config(args.config)
    with _progress("re-embedding") as progress:
        report = Reembed(
            config,
            model=args.model,
            revision=args.revision,
            chunk_rows=args.chunk_rows,
            progress=progress,
        ).run()
    print(
        json.dumps(
            {
                "model_from": report.model_from,
                "model_to": report.model_to,
                "source_version": report.source_version,
                "rows": report.rows,
                "embedded": report.embedded,
                "reused": report.reused,
                "failed": report.failed,
                "switched": report.switched,
                "seconds": round(report.seconds, 1),
            }
        )
    )
    if args.model is not None:
        print(
            f"deltavec: the target now holds {report.model_to}; set model.name = "
            f"{args.model!r} in {args.config} before the next 'deltavec run'",
            file=sys.stderr,
        )
    return 0


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal, throttled log lines otherwise."""
    from deltavec.observe.progress import Progress

    with Progress(None, task=what) as progress:
        yield progress.update


def cmd_demo(args: argparse.Namespace) -> int:
    from deltavec.commands.demo import run_demo

    run_demo(config_path=args.config, query=args.query)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from deltavec.search.cli import run_search

    return run_search(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from deltavec.serve.command import run_serve

    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
