"""``model.precision = "int8"``: the model's Linear layers dynamically quantized, on a CPU.

Chosen by measurement on a 2-core x86 machine (README, Performance): PyTorch's own
dynamic quantization runs inside the model's module stack, so deltavec's
length-sorted token-budget batches, its CPU lanes and ``threads`` apply unchanged,
and it needs no new package and no export step on the workers. ONNX Runtime's
int8 path (sentence-transformers ``backend="onnx"``) needs ``optimum-onnx``, which
does not install beside the transformers release deltavec runs on.

Weights are int8 per output channel and activations are quantized per batch; the
attention products, softmax, GELU and LayerNorm stay in fp32. Two choices keep
every vector within cosine 0.98 of fp32 on all-MiniLM-L6-v2 (per-tensor weights
and 7-bit activations went down to 0.84):

* per-channel weight scales: a single scale per matrix flattens its small rows;
* 8-bit activations where the CPU multiplies u8 x s8 into 32 bits (VNNI).
  Without VNNI (plain AVX2) fbgemm sums pairs of products in 16 bits, which
  saturates at full range, so there the activations keep 7 bits (PyTorch's default).
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def full_range_activations() -> bool:
    """Whether this CPU multiplies 8-bit activations without saturating (VNNI or AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in info.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in _VNNI_FLAGS)
    return False


def quantize_linear_layers(model: Any) -> Any:
    """The model with every ``torch.nn.Linear`` replaced by a dynamically quantized one.

    Args:
        model: the fp32 ``SentenceTransformer`` (or any module), in eval mode.

    Returns:
        The same module, changed in place.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call, and
        # the quantized-tensor constructors warn too; both still work as documented.
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        quantize_dynamic(  # type: ignore[no-untyped-call]
            model,
            {torch.nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            mapping={torch.nn.Linear: _int8_linear_class()},
            inplace=True,
        )
    log.info(
        "int8: Linear layers quantized per channel (engine %s, %d-bit activations)",
        torch.backends.quantized.engine,
        8 if full_range_activations() else 7,
    )
    return model


@functools.cache
def _int8_linear_class() -> type[Any]:
    """PyTorch's dynamic int8 Linear with the activation range this CPU allows (built once)."""
    import torch
    from torch.ao.nn.quantized import dynamic as nnqd

    reduce_range = not full_range_activations()

    class Int8Linear(nnqd.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.ops.quantized.linear_dynamic(
                x, self._packed_params._packed_params, reduce_range=reduce_range
            )
            return out.to(x.dtype)  # type: ignore[no-any-return]

    return Int8Linear
