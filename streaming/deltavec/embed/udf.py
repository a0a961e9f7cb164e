"""The Spark side of the encoder: an Arrow-in, Arrow-out function for ``mapInArrow``.

``mapInArrow`` hands each Python worker Arrow record batches and takes Arrow back,
so texts cross the JVM boundary once and vectors come back as one flat float32
buffer wrapped in a list array: no pandas, and no Python object per vector.

The function object pickled to the workers holds only plain settings; the model is
built on the worker by a factory and kept in a per-process cache keyed by those
settings (Spark reuses Python workers across tasks, so a worker loads it once).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deltavec.columns import (
    EMBEDDING,
    ENCODE_STATS,
    ENCODE_STATS_FIELDS,
    ERROR_CODE,
    ERROR_MESSAGE,
    TEXT,
)
from deltavec.embed.encoder import EncoderSpec, EncodeStats
from deltavec.errors import ModelError

if TYPE_CHECKING:
    import pyarrow as pa

    from deltavec.embed.encoder import Encoder

log = logging.getLogger(__name__)

_encoders: dict[EncoderSpec, Encoder] = {}
_encoders_lock = threading.Lock()


def get_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder for ``spec`` in this process, built on first use.

    A worker that Spark reuses for tasks on different GPUs of one executor keeps
    one copy per GPU (the device is part of ``spec``): at most as many as the
    executor has GPUs, and never a reload when a task lands on a GPU seen before.
    """
    encoder = _encoders.get(spec)
    if encoder is not None:
        return encoder
    with _encoders_lock:
        encoder = _encoders.get(spec)
        if encoder is None:
            from deltavec.embed.encoder import Encoder

            started = time.perf_counter()
            encoder = Encoder(spec)
            _encoders[spec] = encoder
            log.info(
                "loaded model %s on %s in %.1fs (pid %d, package %s)",
                spec.model,
                encoder.device,
                time.perf_counter() - started,
                os.getpid(),
                Path(__file__).parent,
            )
    return encoder


def loaded_encoders() -> int:
    """How many models this process holds (tests use it to prove there is one)."""
    return len(_encoders)


def task_device(requested: str) -> str:
    """The GPU Spark assigned to the running task, else what the config asked for.

    With ``spark.task.resource.gpu.amount`` set, Spark hands each task GPU
    addresses from the executor's pool; tasks running side by side on an executor
    with several GPUs get different ones, so each task's worker uses its own.
    """
    if requested == "cpu":
        return requested
    addresses = _task_gpu_addresses()
    if not addresses:
        return requested
    return f"cuda:{cuda_ordinal(addresses[0], os.environ.get('CUDA_VISIBLE_DEVICES'))}"


def cuda_ordinal(address: str, visible: str | None) -> int:
    """The torch device number of the GPU Spark calls ``address``.

    Spark's addresses are what the discovery script printed: ``nvidia-smi``
    indices, or the entries of ``CUDA_VISIBLE_DEVICES`` where it is set. torch
    numbers only the visible GPUs, from 0, so address "3" of "2,3" is ``cuda:1``.

    Raises:
        ModelError: the address is hidden from this process or is not a number.
    """
    if visible is not None and visible.strip():
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if address in ids:
            return ids.index(address)
        raise ModelError(
            f"Spark assigned GPU {address} to this task, but CUDA_VISIBLE_DEVICES={visible} "
            "hides it; the GPU discovery script must report only the GPUs workers can see"
        )
    try:
        return int(address)
    except ValueError:
        raise ModelError(
            f"Spark assigned GPU address {address!r}, which is not a device number; "
            "the GPU discovery script must print nvidia-smi indices"
        ) from None


def _task_gpu_addresses() -> list[str]:
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        gpus = context.resources().get("gpu") if context else None
    except Exception:  # noqa: BLE001 - outside a task there is nothing to ask
        gpus = None
    return list(gpus.addresses) if gpus is not None else []


def _log_to_stderr() -> None:
    """On a Python worker, send deltavec's INFO lines to stderr, which Spark keeps
    in the executor's log (the driver's logging set-up does not reach workers)."""
    package_log = logging.getLogger("deltavec")
    if logging.getLogger().handlers or package_log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)


@dataclass(frozen=True)
class EmbedBatches:
    """``mapInArrow`` function: adds ``embedding``, ``_error_code`` and ``_error_message``.

    Attributes:
        model: the model as configured ("default", a folder, or an id); resolved
            on the worker so each machine finds its own copy.
        spec: encoder settings, with ``model`` left for the worker to fill in.
        output_names: the output columns, in the order of the declared schema.
        prompt: the document prompt put before every text.
    """

    model: str
    spec: EncoderSpec
    output_names: tuple[str, ...] = ()
    prompt: str = ""

    def __call__(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from deltavec.runtime.faults import poisoned

        _log_to_stderr()
        encoder: Encoder | None = None
        for batch in batches:
            if not batch.num_rows:
                continue
            # Built at the first batch with rows: a task over an empty partition (every
            # partition of a micro-batch whose rows are all unchanged) loads no model.
            if encoder is None:
                encoder = poisoned(get_encoder(self.worker_spec()))
            yield self._embed(encoder, batch)

    def worker_spec(self) -> EncoderSpec:
        """The spec on this worker: the model as this machine resolves it, the task's GPU."""
        from deltavec.embed.models import resolve_model

        return replace(
            self.spec,
            model=resolve_model(self.model, self.spec.revision),
            device=task_device(self.spec.device),
        )

    def load(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """``mapInArrow`` function that only loads the model, passing its input through.

        Run once at start-up (``deltavec.commands.job``), it puts the model into the
        cache of a reused Python worker while the driver is still checking tables,
        so the first micro-batch does not wait for torch and the weights.
        """
        _log_to_stderr()
        get_encoder(self.worker_spec())
        yield from batches

    def _embed(self, encoder: Encoder, batch: pa.RecordBatch) -> pa.RecordBatch:
        import pyarrow as pa

        from deltavec.embed.encoder import encode_isolating_failures

        texts, codes, messages = decode_texts(batch.column(batch.schema.get_field_index(TEXT)))
        good = [i for i, code in enumerate(codes) if code is None]
        vectors = np.full((batch.num_rows, encoder.dim), np.nan, dtype=np.float32)
        stats = EncodeStats()
        if good:
            encoded, failures, stats = encode_isolating_failures(
                encoder, [texts[i] for i in good], prompt=self.prompt
            )
            vectors[good] = encoded
            for failure in failures:
                row = good[failure.index]
                codes[row], messages[row] = failure.code, failure.message
        failed = np.fromiter((c is not None for c in codes), dtype=bool, count=batch.num_rows)
        dim = encoder.dim
        offsets = pa.array(np.arange(0, (batch.num_rows + 1) * dim, dim, dtype=np.int32))
        embedding = pa.ListArray.from_arrays(
            offsets, pa.array(vectors.reshape(-1)), mask=pa.array(failed)
        )
        columns = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
        columns[EMBEDDING] = embedding
        columns[ERROR_CODE] = pa.array(codes, type=pa.string())
        columns[ERROR_MESSAGE] = pa.array(messages, type=pa.string())
        columns[ENCODE_STATS] = encode_stats_column(encoder, stats, batch.num_rows)
        # Failed rows keep their text for the quarantine; good rows drop it here.
        columns[TEXT] = pa.array(
            [texts[i] if failed[i] else None for i in range(batch.num_rows)], type=pa.string()
        )
        return pa.RecordBatch.from_arrays(
            [columns[name] for name in self.output_names], names=list(self.output_names)
        )


def encode_stats_column(encoder: Encoder, stats: EncodeStats, rows: int) -> pa.StructArray:
    """What the model did for one Arrow batch, as a column set on the first row only.

    The driver wants tokens, padding and GPU memory per micro-batch. Riding along
    with the vectors costs one mostly-null struct column, summed by the count the
    sink already runs; a Spark accumulator would need no column but counts a task
    twice when Spark recomputes a lost partition, and does not exist in Spark
    Connect. Only sums and maxima are meaningful: any one row's value is not.
    """
    import pyarrow as pa

    device = str(encoder.device)
    gpu_bytes = _gpu_memory_peak(device) if device.startswith("cuda") else None
    if device == "cuda":
        import torch

        device = f"cuda:{torch.cuda.current_device()}"
    first = {
        "tokens": stats.real_tokens,
        "padded_tokens": stats.padded_tokens,
        "gpu_memory_bytes": gpu_bytes,
        "device": device,
        "dtype": str(encoder.dtype).removeprefix("torch."),
    }
    kinds = {"bigint": pa.int64(), "string": pa.string()}
    fields = [pa.field(name, kinds[kind]) for name, kind in ENCODE_STATS_FIELDS]
    arrays = [
        pa.array([first[f.name]] + [None] * (rows - 1) if rows else [], type=f.type) for f in fields
    ]
    mask = pa.array([i > 0 for i in range(rows)], type=pa.bool_())
    return pa.StructArray.from_arrays(arrays, fields=fields, mask=mask)


def _gpu_memory_peak(device: str) -> int:
    """Peak GPU memory torch reserved since the last call; resets the peak."""
    import torch

    peak = int(torch.cuda.max_memory_reserved(device))
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def decode_texts(column: pa.Array) -> tuple[list[str], list[str | None], list[str | None]]:
    """Python strings from an Arrow string or binary column, flagging invalid UTF-8.

    Spark does not validate strings it reads from Parquet, so bytes that are not
    UTF-8 (lone surrogates, truncated sequences) can reach the worker; they are
    quarantined as ``invalid_utf8`` rather than failing the task.
    """
    import pyarrow as pa

    n = len(column)
    codes: list[str | None] = [None] * n
    messages: list[str | None] = [None] * n
    try:
        texts = column.cast(pa.string()).to_pylist()
        return [t or "" for t in texts], codes, messages
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    raw = column.cast(pa.binary()).to_pylist()
    decoded: list[str] = []
    for i, value in enumerate(raw):
        try:
            decoded.append((value or b"").decode("utf-8"))
        except UnicodeDecodeError as exc:
            decoded.append((value or b"").decode("utf-8", errors="replace"))
            codes[i] = "invalid_utf8"
            messages[i] = f"text is not valid UTF-8: {exc.reason} at byte {exc.start}"
    return decoded, codes, messages
