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
from collections.abc import Callable, Sequence

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

    status = sub.add_parser(
        "status", help="show how far the job got: lag, table sizes, last batch (no job needed)"
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON, for scripts")
    status.set_defaults(command=cmd_status)

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
                "seconds": round(summary.seconds, 1),
            }
        )
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from streaming.config import load_config
    from streaming.session import build_session
    from streaming.status import format_status, job_status

    config = load_config(args.config)
    spark_cfg = config.spark
    # A local session is enough to read logs and checkpoints, and never queues
    # behind the job on its cluster; it takes the config's settings for storage
    # credentials and catalogs.
    spark = build_session(
        master="local[1]" if spark_cfg.master is not None else None,
        app_name=f"{spark_cfg.app_name}-status",
        conf={"spark.ui.enabled": "false", **spark_cfg.conf},
    )
    status = job_status(spark, config)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streaming.demo import run_demo

    run_demo(config_path=args.config, query=args.query)
    return 0


if __name__ == "__main__":
    sys.exit(main())
