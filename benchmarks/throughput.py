"""``make bench``: the ways to embed the same texts on this machine, side by side.

Variants, all on the CPU with the default model (all-MiniLM-L6-v2), fp32 unless named:

* ``st_encode``: sentence-transformers ``encode`` in this process, its defaults plus
  the best batch size of a quick sweep (the peer a user would pick);
* ``encoder``: deltavec's encoder in this process, its defaults;
* ``naive_udf``: the seed article's pandas UDF (model loaded inside the UDF, 20-row
  chunks), Delta table in, Delta table out;
* ``predict_batch_udf``: Spark's ``pyspark.ml.functions.predict_batch_udf`` around
  sentence-transformers, Delta in, Delta out;
* ``pipeline``: deltavec's whole streaming job (Delta source -> micro-batch ->
  model -> MERGE into the target), in steady state: a first micro-batch loads the
  model in every Python worker and is timed separately;
* ``encoder_int8`` and ``pipeline_int8``: the same with ``model.precision = "int8"``;
* ``st_onnx_int8``: sentence-transformers on ONNX Runtime with its int8 export, the
  int8 peer a CPU user would pick (``benchmarks/peers.py``), best batch size.

The STS-B dev Spearman of the encoder in fp32 and in int8
(``stsb_dev_spearman_fp32``/``_int8``) and the least cosine of each int8 vector to
its fp32 one (``int8_min_cosine_vs_fp32``) come with them. ``--int8-quick`` (``make
bench-int8``) runs only ``encoder``, ``encoder_int8`` and ``st_onnx_int8`` on 2,000
texts, interleaved, in under 5 minutes.

Every variant runs ``--rounds`` times and keeps its best round, so each side of a
ratio gets the same treatment on a machine whose speed drifts by a few percent
from one minute to the next. The in-process variants run once before the Spark
variants and again after them, so a change in the machine's load (other
processes) during the run does not favour one side. Each Spark variant runs its
rounds back to back, on fresh tables each round, in a SparkSession of its own
(fresh Python workers), with ``local[N]`` on all N cores. The 1-minute load
average at the end of each variant's runs is recorded beside it. Peers get
Spark's default Arrow batch (10,000 rows); the pipeline its own settings. Last, a
single micro-batch of ``--rss-rows`` rows goes through the pipeline while the
peak resident memory of every Python worker is read from ``/proc`` (Linux).

The default 8,000 texts make the pipeline's one micro-batch about a minute of
model work on 2 cores, the least ``conf/TUNING.md`` recommends: below that, the
fixed cost of a micro-batch (MERGE, commits) weighs on the pipeline's rate.

The last line printed is one JSON object: rows per second per variant, the
ratios, and the details behind them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
# The checkout's package (streaming/deltavec) and benchmarks, installed or not.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "streaming"))
# Spark's Python workers import this checkout (benchmarks.peers, deltavec), not
# whatever copy of the package the interpreter has installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO / "streaming"), str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

from benchmarks.corpus import mixed_texts, sentences, sts_dev_pairs  # noqa: E402
from deltavec.sink.batch import ONE_TASK_ROWS  # noqa: E402

ST_BATCH_SIZES = (16, 32, 64, 128)
PEER_ARROW_BATCH = 10_000  # Spark's default spark.sql.execution.arrow.maxRecordsPerBatch
# More rows than the sink gives one task (ONE_TASK_ROWS), so the warm-up batch is
# dealt to every slot and each slot's Python worker loads the model before the
# clock starts; at 64 only one did, and the first timed batch waited for the other.
WARMUP_ROWS = 4 * ONE_TASK_ROWS
MIB = 1 << 20
VARIANTS = (
    "st_encode",
    "encoder",
    "encoder_bf16",
    "encoder_int8",
    "st_onnx_int8",
    "controls",
    "stsb",
    "naive_udf",
    "predict_batch_udf",
    "pipeline",
    "pipeline_int8",
    "rss",
)
_T = TypeVar("_T")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cores = args.cores or os.cpu_count() or 1
    texts = mixed_texts(args.sentences, args.paragraphs)
    rss_texts = (
        mixed_texts(args.rss_rows * 3 // 4, args.rss_rows - args.rss_rows * 3 // 4, seed=1)
        if args.rss_texts == "mix"
        else mixed_texts(args.rss_rows, 0, seed=1)
    )
    result: dict[str, Any] = {
        "command": "python benchmarks/throughput.py " + " ".join(argv or sys.argv[1:]),
        "rows": len(texts),
        "texts": f"{args.sentences} {sentences()[1]} + {args.paragraphs} paragraphs "
        "of 100-300 words",
        "cores": cores,
        "cpu": _cpu_name(),
        "load_average_start": round(os.getloadavg()[0], 1),
    }
    from deltavec.embed.models import resolve_model

    model_path = resolve_model("default")
    skip = set(args.skip)
    with tempfile.TemporaryDirectory(prefix="deltavec-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        local = InProcess(texts, model_path, skip, result, work)
        local.round(controls=True)
        local.sts_spearman()
        peers: dict[str, Callable[[], Any]] = {"naive_udf": lambda: _naive(model_path)}
        peers["predict_batch_udf"] = lambda: _pbu(model_path, int(result.get("st_batch_size", 32)))
        for name, udf in peers.items():
            if name in skip:
                continue
            with _spark(cores, work, arrow_batch=PEER_ARROW_BATCH) as spark:
                rates = [
                    peer_to_delta(spark, _round(work, r), texts, cores, name, udf())
                    for r in range(args.rounds)
                ]
                result[name] = max(rates)
                result[f"{name}_rounds"] = rates
                _note_load(result, name)
        if "pipeline" not in skip:
            with _spark(cores, work) as spark:
                runs = [
                    pipeline(spark, _round(work, r), texts, cores, args.micro_batches)
                    for r in range(args.rounds)
                ]
                result.update(max(runs, key=lambda run: run["pipeline"]))
                result["pipeline_rounds"] = [run["pipeline"] for run in runs]
                _note_load(result, "pipeline")
        if "pipeline_int8" not in skip:
            with _spark(cores, work) as spark:
                runs = [
                    pipeline(
                        spark, _round(work, r), texts, cores, args.micro_batches, precision="int8"
                    )
                    for r in range(args.rounds)
                ]
                result.update(max(runs, key=lambda run: run["pipeline_int8"]))
                result["pipeline_int8_rounds"] = [run["pipeline_int8"] for run in runs]
                _note_load(result, "pipeline_int8")
        # The other rounds run right after the Spark variants, so a change in the
        # machine's load between the first round and the Spark runs evens out.
        for _ in range(args.rounds - 1):
            local.round(controls=False)
        if "rss" not in skip:
            with _spark(cores, work) as spark:
                result.update(peak_memory(spark, work, rss_texts, cores))
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    _ratios(result)
    _print_table(result)
    print(json.dumps(result, sort_keys=False))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=6000, help="short texts (default 6000)")
    parser.add_argument(
        "--paragraphs", type=int, default=2000, help="100-300 word texts (default 2000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of every variant, best kept; in-process ones run first before the "
        "Spark variants, the rest after them (default 2)",
    )
    parser.add_argument(
        "--micro-batches", type=int, default=1, help="micro-batches the pipeline splits rows into"
    )
    parser.add_argument("--rss-rows", type=int, default=100_000, help="rows of the memory batch")
    parser.add_argument(
        "--rss-texts",
        choices=("sentences", "mix"),
        default="sentences",
        help="texts of the memory batch: short sentences (fast) or the benchmark mix",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="4x the texts, and the memory batch on the mix (hours on 2 cores)",
    )
    parser.add_argument("--cores", type=int, default=None, help="Spark local[N] (default: all)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=VARIANTS,
        help="variants to leave out (their ratios are then missing)",
    )
    parser.add_argument(
        "--int8-quick",
        action="store_true",
        help="make bench-int8: only encoder, encoder_int8 and st_onnx_int8 (and STS-B), "
        "on 1,500 sentences and 500 paragraphs",
    )
    parser.add_argument("--work-dir", default=None, help="where the temporary tables go")
    args = parser.parse_args(argv)
    if args.large:
        args.sentences *= 4
        args.paragraphs *= 4
        args.rss_texts = "mix"
    if args.int8_quick:
        if (args.sentences, args.paragraphs) == (6000, 2000):  # the defaults: 2,000 texts
            args.sentences, args.paragraphs = 1500, 500
        keep = {"encoder", "encoder_int8", "st_onnx_int8", "stsb"}
        args.skip = sorted(set(args.skip) | (set(VARIANTS) - keep))
    return args


# -- in process ------------------------------------------------------------------------------


class InProcess:
    """``st_encode``, ``encoder``, ``encoder_bf16``, ``encoder_int8`` and ``st_onnx_int8``.

    Each ``round`` runs every variant once and keeps each one's best time. The
    first round also runs the one-core controls: both libraries with one thread,
    which shows how much of the gap is batching and how much is the use of cores.
    """

    def __init__(
        self,
        texts: list[str],
        model_path: str,
        skip: set[str],
        result: dict[str, Any],
        work: Path,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from deltavec.embed.encoder import Encoder, EncoderSpec

        self.texts = texts
        self.result = result
        self.best_seconds: dict[str, float] = {}
        self.runs: dict[str, Callable[[], object]] = {}
        self.controls: dict[str, Callable[[], object]] = {}
        self.encoders: dict[str, Encoder] = {}
        self.skip = skip
        result["torch_threads"] = torch.get_num_threads()
        reference = None
        if "encoder" not in skip:
            started = time.perf_counter()
            encoder = Encoder(EncoderSpec(model=model_path, device="cpu"))
            result["model_load_seconds"] = round(time.perf_counter() - started, 1)
            self.encoders["fp32"] = encoder
            # Warm-up, the padding/tokenizer report, and the fp32 vectors int8 is held to.
            reference, stats = encoder.encode(texts)
            result["tokens"] = stats.real_tokens
            result["padding_ratio"] = round(stats.padding_ratio, 4)
            result["tokenize_share"] = round(
                stats.tokenize_seconds / (stats.tokenize_seconds + stats.forward_seconds), 4
            )
            result["encoder_lanes"] = encoder.lanes
            self.runs["encoder"] = lambda: encoder.encode(texts)
            if "controls" not in skip:
                one_lane = _one_thread(
                    lambda: Encoder(EncoderSpec(model=model_path, device="cpu", threads=1))
                )
                self.controls["encoder_1_thread"] = lambda: _one_thread(
                    lambda: one_lane.encode(texts)
                )
        if "encoder_bf16" not in skip:
            bf16 = Encoder(EncoderSpec(model=model_path, device="cpu", precision="bf16"))
            self.runs["encoder_bf16"] = lambda: bf16.encode(texts)
        if "encoder_int8" not in skip:
            started = time.perf_counter()
            int8 = Encoder(EncoderSpec(model=model_path, device="cpu", precision="int8"))
            result["int8_model_load_seconds"] = round(time.perf_counter() - started, 1)
            self.encoders["int8"] = int8
            vectors, _ = int8.encode(texts)
            if reference is not None:
                result["int8_min_cosine_vs_fp32"] = _min_cosine(vectors, reference)
            self.runs["encoder_int8"] = lambda: int8.encode(texts)
        if "st_onnx_int8" not in skip:
            self._onnx_peer(model_path, work, reference)
        if "st_encode" not in skip:
            model = SentenceTransformer(model_path, device="cpu")
            model.encode(texts[:64])
            sample = texts[:: max(1, len(texts) // 400)]
            sweep = {}
            for size in ST_BATCH_SIZES:
                started = time.perf_counter()
                model.encode(sample, batch_size=size)
                sweep[size] = round(len(sample) / (time.perf_counter() - started), 1)
            best = max(sweep, key=lambda size: sweep[size])
            result["st_batch_sweep"] = sweep
            result["st_batch_size"] = best
            self.runs["st_encode"] = lambda: model.encode(texts, batch_size=best)
            if "controls" not in skip:
                self.controls["st_encode_1_thread"] = lambda: _one_thread(
                    lambda: model.encode(texts, batch_size=best)
                )

    def _onnx_peer(self, model_path: str, work: Path, reference: Any) -> None:
        from benchmarks.peers import st_onnx_int8

        try:
            encode, how = st_onnx_int8(model_path, work)
        except ImportError as exc:
            self.result["st_onnx_int8_unavailable"] = str(exc).splitlines()[0]
            return
        texts = self.texts
        sample = texts[:: max(1, len(texts) // 400)]
        encode(sample[:64], 32)
        sweep = {}
        for size in ST_BATCH_SIZES:
            started = time.perf_counter()
            encode(sample, size)
            sweep[size] = round(len(sample) / (time.perf_counter() - started), 1)
        best = max(sweep, key=lambda size: sweep[size])
        self.result["st_onnx_int8_how"] = how
        self.result["st_onnx_int8_batch_sweep"] = sweep
        self.result["st_onnx_int8_batch_size"] = best
        if reference is not None:
            self.result["st_onnx_int8_min_cosine_vs_fp32"] = _min_cosine(
                encode(texts, best), reference
            )
        self.runs["st_onnx_int8"] = lambda: encode(texts, best)

    def sts_spearman(self) -> None:
        """STS-B dev Spearman of each encoder (cosine of the pair against the gold score)."""
        pairs = sts_dev_pairs()
        if "stsb" in self.skip or not pairs:
            return
        from scipy.stats import spearmanr

        gold = [score for score, _, _ in pairs]
        for name, encoder in self.encoders.items():
            first, _ = encoder.encode([s1 for _, s1, _ in pairs])
            second, _ = encoder.encode([s2 for _, _, s2 in pairs])
            rho = spearmanr((first * second).sum(axis=1), gold).statistic
            self.result[f"stsb_dev_spearman_{name}"] = round(float(rho), 4)

    def round(self, *, controls: bool) -> None:
        for name, run in (self.runs | self.controls if controls else self.runs).items():
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            _progress(f"{name}: {len(self.texts) / seconds:.1f} rows/s")
            if seconds < self.best_seconds.get(name, math.inf):
                self.best_seconds[name] = seconds
                self.result[name] = round(len(self.texts) / seconds, 1)
                _note_load(self.result, name)


def _min_cosine(vectors: Any, reference: Any) -> float:
    """The least cosine between a row of ``vectors`` and the same row of ``reference``."""
    import numpy as np

    dots = (vectors * reference).sum(axis=1)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return round(float((dots / norms).min()), 4)


def _one_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` with torch on one intra-op thread in this thread, then the old setting back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# -- Spark -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _spark(cores: int, work: Path, *, arrow_batch: int | None = None) -> Iterator[Any]:
    """A fresh local SparkSession (and so fresh Python workers) for one variant."""
    from deltavec.runtime.session import build_session

    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.warehouse.dir": str(work / "warehouse"),
        # Only read when this call starts the JVM (the first variant).
        "spark.driver.memory": "2g",
    }
    if arrow_batch is not None:
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(arrow_batch)
    spark = build_session(master=f"local[{cores}]", app_name="deltavec-bench", conf=conf)
    try:
        yield spark
    finally:
        spark.stop()


def _round(work: Path, number: int) -> Path:
    """A fresh folder for one round of a Spark variant: new tables, new checkpoint."""
    folder = work / f"round{number}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_source(
    spark: Any, path: Path, texts: list[str], *, files: int, first_id: int = 0
) -> None:
    rows = [(first_id + i, text) for i, text in enumerate(texts)]
    frame = spark.createDataFrame(rows, "id long, text string").repartition(files)
    frame.write.format("delta").mode("append").save(str(path))


def _naive(model_path: str) -> Any:
    from benchmarks.peers import naive_udf

    return naive_udf(model_path)


def _pbu(model_path: str, batch_size: int) -> Any:
    from benchmarks.peers import predict_batch

    return predict_batch(model_path, batch_size)


def peer_to_delta(
    spark: Any, work: Path, texts: list[str], cores: int, name: str, udf: Any
) -> float:
    """Rows per second of ``udf`` reading the source table and writing a Delta table."""
    from pyspark.sql import functions as F

    source = work / f"{name}_source"
    # One file per core: every variant reads as many partitions as there are cores.
    _write_source(spark, source, texts, files=cores)
    if name == "predict_batch_udf":
        # predict_batch_udf caches the model per Python worker: load it in each first,
        # as the pipeline's first micro-batch does.
        spark.range(cores * 8).repartition(cores).select(
            udf(F.lit("warm-up").cast("string"))
        ).write.format("noop").mode("overwrite").save()
    started = time.perf_counter()
    frame = spark.read.format("delta").load(str(source))
    frame.select("id", udf(F.col("text")).alias("embedding")).write.format("delta").save(
        str(work / f"{name}_target")
    )
    seconds = time.perf_counter() - started
    written = spark.read.format("delta").load(str(work / f"{name}_target")).count()
    if written != len(texts):
        raise RuntimeError(f"{name} wrote {written} rows, expected {len(texts)}")
    _progress(f"{name}: {len(texts) / seconds:.1f} rows/s")
    return round(len(texts) / seconds, 1)


def _job_config(
    work: Path, name: str, cores: int, files_per_batch: int, precision: str = "auto"
) -> Any:
    from deltavec.config import DeltavecConfig

    return DeltavecConfig(
        source={
            "path": str(work / f"{name}_source"),
            "key": ["id"],
            "template": "{text}",
            "max_files_per_trigger": files_per_batch,
        },
        target={"path": str(work / f"{name}_target")},
        checkpoint={"location": str(work / f"{name}_checkpoint")},
        model={"precision": precision},
        spark={"master": f"local[{cores}]"},
        metrics={"port": 0},
    )


def pipeline(
    spark: Any,
    work: Path,
    texts: list[str],
    cores: int,
    micro_batches: int,
    *,
    precision: str = "auto",
) -> dict[str, Any]:
    """The streaming job, Delta -> MERGE, in steady state.

    The source holds a small warm-up commit and then the benchmark rows; one query
    with ``availableNow`` reads them ``cores`` files per micro-batch, oldest first.
    The first micro-batch is the warm-up (it loads the model in every Python
    worker); the clock runs from its end to the end of the last one, so it covers
    every benchmark micro-batch with Spark's own offset and commit bookkeeping in
    between, as in a running job, and no start-up work. With ``precision="int8"``
    the keys are ``pipeline_int8...``.
    """
    from deltavec.commands.job import Job
    from deltavec.sink.batch import BatchReport

    name = "pipeline" if precision == "auto" else f"pipeline_{precision}"
    source = work / f"{name}_source"
    warmup = [f"warm-up text number {i}" for i in range(WARMUP_ROWS)]
    _write_source(spark, source, warmup, files=cores, first_id=len(texts))
    _write_source(spark, source, texts, files=cores * max(1, micro_batches))
    job = Job(_job_config(work, name, cores, files_per_batch=cores, precision=precision), spark)
    ends: list[tuple[float, BatchReport]] = []
    job.on_batch(lambda report: ends.append((time.perf_counter(), report)))
    started = time.perf_counter()
    job.prepare()
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    query = job.start(once=True)
    query.awaitTermination()
    if query.exception() is not None:
        raise RuntimeError(f"{name} query failed: {query.exception()}")
    embedded = [report.embedded for _, report in ends]
    if len(ends) < 2 or embedded[0] != WARMUP_ROWS or sum(embedded[1:]) != len(texts):
        raise RuntimeError(
            f"{name} embedded {embedded} rows per micro-batch, expected "
            f"{WARMUP_ROWS} first and {len(texts)} after"
        )
    seconds = ends[-1][0] - ends[0][0]
    phases: dict[str, float] = {}
    for _, report in ends[1:]:
        for phase, value in report.seconds.items():
            phases[phase] = round(phases.get(phase, 0.0) + value, 1)
    _progress(f"{name}: {len(texts) / seconds:.1f} rows/s")
    return {
        name: round(len(texts) / seconds, 1),
        f"{name}_seconds": round(seconds, 1),
        f"{name}_micro_batches": len(ends) - 1,
        f"{name}_phase_seconds": phases,
        f"{name}_first_batch_seconds": round(ends[0][0] - started, 1),
        f"{name}_prepare_seconds": round(prepare_seconds, 1),
    }


def peak_memory(spark: Any, work: Path, texts: list[str], cores: int) -> dict[str, Any]:
    """One micro-batch of ``len(texts)`` rows; the peak RSS of each Python worker."""
    from deltavec.commands.job import Job

    _write_source(spark, work / "rss_source", texts, files=cores * 4)
    config = _job_config(work, "rss", cores, files_per_batch=10_000)
    started = time.perf_counter()
    summary = Job(config, spark).run(once=True)
    seconds = time.perf_counter() - started
    jvm = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    workers = [pid for pid in _descendants(jvm) if "pyspark" in _cmdline(pid)]
    peaks = [_peak_rss(pid) for pid in workers]
    if summary.batches != 1 or summary.embedded != len(texts):
        raise RuntimeError(
            f"memory run embedded {summary.embedded} rows in {summary.batches} micro-batches, "
            f"expected {len(texts)} in 1"
        )
    _progress(f"memory batch: {len(texts)} rows, worker peak {max(peaks) / MIB:.0f} MiB")
    return {
        "rss_rows": len(texts),
        "rss_rows_per_second": round(len(texts) / seconds, 1),
        "worker_peak_rss_mib": round(max(peaks) / MIB),
        "python_processes": len(workers),
        "jvm_peak_rss_mib": round(_peak_rss(jvm) / MIB),
    }


# -- /proc ------------------------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                # The command name may hold spaces and parentheses; fields follow the last ')'.
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has had, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- report -----------------------------------------------------------------------------------


def _ratios(result: dict[str, Any]) -> None:
    pairs = {
        "ratio_pipeline_vs_encoder": ("pipeline", "encoder"),
        "ratio_pipeline_vs_naive_udf": ("pipeline", "naive_udf"),
        "ratio_pipeline_vs_predict_batch_udf": ("pipeline", "predict_batch_udf"),
        "ratio_encoder_vs_st_encode": ("encoder", "st_encode"),
        "ratio_int8_vs_fp32": ("encoder_int8", "encoder"),
        "ratio_int8_vs_st_onnx_int8": ("encoder_int8", "st_onnx_int8"),
        "ratio_pipeline_int8_vs_encoder_int8": ("pipeline_int8", "encoder_int8"),
    }
    for key, (top, bottom) in pairs.items():
        if top in result and bottom in result:
            result[key] = round(result[top] / result[bottom], 3)


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        ("st_encode", f"sentence-transformers encode, batch_size={result.get('st_batch_size')}"),
        ("encoder", f"deltavec encoder, {result.get('encoder_lanes')} lanes, fp32"),
        ("encoder_bf16", "deltavec encoder, precision=bf16 (reference, not a target)"),
        ("encoder_int8", "deltavec encoder, precision=int8"),
        ("st_onnx_int8", f"ONNX Runtime int8, batch_size={result.get('st_onnx_int8_batch_size')}"),
        ("st_encode_1_thread", "control: sentence-transformers on one core"),
        ("encoder_1_thread", "control: deltavec encoder on one core"),
        ("naive_udf", "pandas UDF, model loaded per call, 20-row chunks -> Delta"),
        ("predict_batch_udf", f"predict_batch_udf(batch_size={result.get('st_batch_size')})"),
        ("pipeline", f"deltavec job, Delta -> MERGE, {result.get('pipeline_micro_batches')} mb"),
        ("pipeline_int8", "deltavec job, precision=int8"),
    ]
    print()
    print(f"{result['rows']} texts ({result['texts']}), {result.get('tokens', '?')} tokens")
    print(f"{result['cores']} cores ({result['cpu']}), load average {result['load_average_start']}")
    loads = result.get("load_average_at", {})
    print(f"{'variant':<19}{'rows/s':>9}{'load':>6}  how")
    for name, how in rows:
        if name in result:
            print(f"{name:<19}{result[name]:>9.1f}{loads.get(name, ''):>6}  {how}")
    figures = ("ratio_", "stsb_", "int8_min", "st_onnx_int8_min")
    for key in (k for k in result if k.startswith(figures)):
        print(f"{key:<38}{result[key]:>7.3f}")
    if "worker_peak_rss_mib" in result:
        print(
            f"peak Python worker RSS, {result['rss_rows']}-row micro-batch: "
            f"{result['worker_peak_rss_mib']} MiB"
        )


def _note_load(result: dict[str, Any], name: str) -> None:
    """The 1-minute load average when ``name`` was measured (best run), for the record."""
    result.setdefault("load_average_at", {})[name] = round(os.getloadavg()[0], 1)


def _progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
