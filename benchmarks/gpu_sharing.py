"""How many concurrent tasks per GPU pay off: N encoder processes sharing one device.

Each process stands in for one Spark task's Python worker: it loads its own copy
of the model on the device (as every worker does), waits at a common start line,
then encodes its share of the texts in Arrow-batch-sized calls. The figure that
matters is the aggregate rate (texts/s of all processes together) as N grows:
where it stops rising, more tasks per GPU only cost memory.

Two models bracket the useful range:
  * ``default``: all-MiniLM-L6-v2 (6 layers, 384 wide, 22M parameters);
  * ``bert-base``: a BERT-base-shaped model (12 layers, 768 wide, 110M parameters)
    with random weights and MiniLM's tokenizer: SPECTER's shape and cost, without
    downloading SPECTER (the weights do not change the speed).

    python benchmarks/gpu_sharing.py --device cuda --model default --processes 1,2,4,8
    python benchmarks/gpu_sharing.py --device cuda --model bert-base --processes 1,2,4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# One Arrow batch per call, as spark-gpu.conf sets spark.sql.execution.arrow.maxRecordsPerBatch.
ARROW_BATCH = 8192


@dataclass
class Result:
    model: str
    device: str
    processes: int
    texts: int
    seconds: float
    texts_per_second: float
    speedup: float
    peak_gpu_mb_per_process: float


def sample_texts(count: int) -> list[str]:
    """The demo's paper titles and abstracts (shipped with the package), repeated."""
    lines = (
        resources.files("deltavec.commands").joinpath("demo_data/papers.jsonl").read_text("utf-8")
    ).splitlines()
    papers = [json.loads(line) for line in lines if line.strip()]
    texts = [f"{p['title']} [SEP] {p['abstract']}" for p in papers]
    return [texts[i % len(texts)] for i in range(count)]


def bert_base_folder(dest: Path) -> Path:
    """A randomly initialised BERT-base with the default model's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltavec.embed.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    config = BertConfig(vocab_size=tokenizer.vocab_size)  # BertConfig's defaults are BERT-base
    BertModel(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _worker(model: str, device: str, texts: list[str], start: Any, ready: Any, out: Any) -> None:
    import torch

    from deltavec.embed.encoder import Encoder, EncoderSpec

    encoder = Encoder(EncoderSpec(model=model, device=device, threads=1))
    encoder.encode(texts[:256])  # warm up kernels and the allocator
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ready.release()
    start.wait()
    began = time.perf_counter()
    for lo in range(0, len(texts), ARROW_BATCH):
        encoder.encode(texts[lo : lo + ARROW_BATCH])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    out.put((began, time.perf_counter(), peak))


def run(model: str, label: str, device: str, processes: int, texts: list[str]) -> Result:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    start, ready, out = ctx.Event(), ctx.Semaphore(0), ctx.Queue()
    share = len(texts) // processes
    workers = [
        ctx.Process(
            target=_worker,
            args=(model, device, texts[i * share : (i + 1) * share], start, ready, out),
        )
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    start.set()
    spans = [out.get() for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode:
            raise RuntimeError(f"a worker exited with {w.exitcode}")
    seconds = max(end for _, end, _ in spans) - min(begin for begin, _, _ in spans)
    done = share * processes
    return Result(
        model=label,
        device=device,
        processes=processes,
        texts=done,
        seconds=round(seconds, 3),
        texts_per_second=round(done / seconds, 1),
        speedup=0.0,
        peak_gpu_mb_per_process=round(max(peak for _, _, peak in spans), 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["default", "bert-base"], default="default")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated counts")
    parser.add_argument("--texts", type=int, default=32768, help="texts in all, per run")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    from deltavec.embed.models import resolve_model

    texts = sample_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            resolve_model("default")
            if args.model == "default"
            else str(bert_base_folder(Path(tmp) / "bert-base"))
        )
        results: list[Result] = []
        for n in (int(part) for part in args.processes.split(",")):
            result = run(folder, args.model, args.device, n, texts)
            base = results[0].texts_per_second if results else result.texts_per_second
            result.speedup = round(result.texts_per_second / base, 2)
            results.append(result)
            print(
                f"{result.model:9s} {result.device:7s} processes={n:<2d} "
                f"{result.texts_per_second:9.1f} texts/s  x{result.speedup:<5}  "
                f"peak {result.peak_gpu_mb_per_process:.0f} MB/process",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
