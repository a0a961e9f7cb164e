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

from streaming.errors import DeltavecError

log = logging.getLogger("streaming")

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
    run.set_defaults(command=cmd_run)

    reembed = sub.add_parser(
        "reembed",
        help="re-embed the target with another model, switching consumers over at once",
    )
    _config_arg(reembed)
    reembed.add_argument(
        "--model", required=True, help='the new model: "default", a folder or a Hugging Face id'
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
    return parser


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
    from streaming.config import load_config
    from streaming.job import Job

    config = load_config(args.config)
    summary = Job(config).run(once=args.once)
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


def cmd_reembed(args: argparse.Namespace) -> int:
    from streaming.config import load_config
    from streaming.reembed import Reembed

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
    print(
        f"deltavec: the target now holds {report.model_to}; set model.name = "
        f"{args.model!r} in {args.config} before the next 'deltavec run'",
        file=sys.stderr,
    )
    return 0


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal, one log line per step otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc=what, unit="rows", file=sys.stderr)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            yield update
        finally:
            bar.close()
    else:

        def log_line(done: int, total: int) -> None:
            log.info("%s: %d of %d rows", what, done, total)

        yield log_line


def cmd_demo(args: argparse.Namespace) -> int:
    from streaming.demo import run_demo

    run_demo(config_path=args.config, query=args.query)
    return 0


if __name__ == "__main__":
    sys.exit(main())
