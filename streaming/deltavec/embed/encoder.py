"""Text to vectors with a sentence-transformers model. No Spark in here.

What a vector *is* belongs to the model's own sentence-transformers modules
(Transformer, Pooling, Dense, Normalize, ...), loaded by ``SentenceTransformer``
itself; how batches are cut and scheduled belongs to deltavec. The encoder
tokenizes a whole Arrow batch in one call with the model's tokenizer (its
lowercasing included), sorts the sequences by token length, packs them into
forward passes under a budget of padded tokens and runs the model's module stack
on each. A plain transformers folder, without sentence-transformers files, gets
mean pooling and L2 normalisation.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from deltavec.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")

# Characters kept per token of the window before tokenizing: far more than any
# real text needs (English averages about 4), so truncation is still decided by
# the tokenizer, but a 10 MB string is never tokenized whole.
_CHARS_PER_TOKEN_CAP = 32


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder on a worker; hashable, so it keys the cache.

    Attributes:
        model: a local folder (already resolved: never "default" nor a Hub id).
        revision: the Hugging Face revision the folder was resolved from, for the log.
        max_tokens: tokens kept per text (window length); None for the model's limit.
        batch_tokens: padded tokens per forward pass; None picks one for the device.
        device: "auto", "cpu", "cuda" or "cuda:N".
        precision: "auto", "fp32", "fp16", "bf16" or "int8"; auto is bf16/fp16 on a GPU,
            fp32 on a CPU; int8 (CPU only) quantizes the Linear layers (``embed/int8.py``).
        long_text: "truncate" keeps the first window; "chunk" averages all windows.
        chunk_overlap: tokens shared by neighbouring windows in chunk mode.
        max_chunks: windows per text at most in chunk mode.
        trust_remote_code: passed to sentence-transformers and transformers; off
            unless the config turns it on.
        threads: CPU cores this encoder may keep busy; None takes torch's default
            (``OMP_NUM_THREADS``, else the machine's cores). On a CPU each core runs
            its own forward passes with one intra-op thread (see ``_CpuLanes``).
    """

    model: str
    revision: str | None = None
    max_tokens: int | None = None
    batch_tokens: int | None = None
    device: str = "auto"
    precision: str = "auto"
    long_text: str = "truncate"
    chunk_overlap: int = 32
    max_chunks: int = 32
    trust_remote_code: bool = False
    threads: int | None = None


@dataclass
class EncodeStats:
    """What one ``encode`` call did, for metrics and the padding report."""

    texts: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_passes: int = 0
    truncated: int = 0
    oom_splits: int = 0
    tokenize_seconds: float = 0.0
    forward_seconds: float = 0.0

    @property
    def padding_ratio(self) -> float:
        """Padded tokens per real token; 1.0 means no padding at all."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0

    def add(self, other: EncodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Sequences:
    """Token windows of a batch of texts; ``owner[i]`` is the text window i came from."""

    ids: list[list[int]]
    owner: np.ndarray
    truncated: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.fromiter((len(s) for s in self.ids), dtype=np.int64, count=len(self.ids))


class Encoder:
    """A loaded sentence-transformers model that turns lists of strings into float32 rows.

    Attributes:
        model: the ``SentenceTransformer`` (its modules define the vector).
        tokenizer: the model's fast tokenizer, lowercasing included.
        max_tokens: the window: tokens kept per sequence.
        prompts: the model's named prompts (``config_sentence_transformers.json``).
        normalizes: whether the model's last module L2-normalises.
        modules: the module stack, as recorded in the target (``Transformer>Pooling(cls)>...``).
    """

    def __init__(self, spec: EncoderSpec) -> None:
        import torch

        self.spec = spec
        self.device = _pick_device(spec.device)
        if spec.precision == "int8" and self.device != "cpu":
            raise ModelError(
                f"model.precision = 'int8' runs on a CPU only, and this process would run on "
                f"{self.device}; set model.device = 'cpu', or use fp16 or bf16 on a GPU"
            )
        self.lanes = 1
        self._lanes: _CpuLanes | None = None
        if self.device == "cpu":
            self.lanes = spec.threads or torch.get_num_threads()
            if self.lanes == 1:
                torch.set_num_threads(1)
        elif spec.threads:
            torch.set_num_threads(spec.threads)
        self.dtype = _pick_dtype(spec.precision, self.device)
        self.batch_tokens = spec.batch_tokens or _default_batch_tokens(self.device)
        folder = Path(spec.model)
        self.model = _load_sentence_transformer(spec, self.device)
        first = self.model[0]
        tokenizer = getattr(first, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise ModelError(f"model {spec.model} has no fast tokenizer; deltavec needs one")
        self.tokenizer: Any = tokenizer
        if not (folder / "modules.json").is_file():
            from sentence_transformers.base.modules import Normalize

            # sentence-transformers gives such a folder mean pooling; deltavec has
            # always normalised it too, so its targets keep their vectors.
            self.model.append(Normalize())
            log.info(
                "model %s has no sentence-transformers files: mean pooling and L2 normalisation",
                spec.model,
            )
        # Weights stay in fp32 whatever dtype they were saved in (many models ship
        # fp16 or bf16); autocast picks the arithmetic, so `precision` means what it says.
        self.model.to(dtype=torch.float32)
        self.model.eval()
        if spec.precision == "int8":
            from deltavec.embed.int8 import quantize_linear_layers

            # From the fp32 weights, on the worker, in well under a second for a
            # MiniLM: nothing to export or cache.
            quantize_linear_layers(self.model)
        self.prompts: dict[str, str] = dict(getattr(self.model, "prompts", None) or {})
        self.normalizes = any(type(m).__name__ == "Normalize" for m in self.model)
        # The tokenizer itself lowercases (sentence-transformers installs a normaliser).
        self.lowercase = bool(getattr(first, "do_lower_case", False))
        self.modules = ">".join(_describe(m) for m in self.model)
        self._prompt_aware = any(getattr(m, "include_prompt", True) is False for m in self.model)
        self.max_tokens = self._window(first)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        # What runs the first module: torch, or a stand-in (``with_transformer``).
        self.runtime = "torch"
        self._transformer: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None
        try:
            self.dim = self._probe_dim()
        except ModelError:
            raise
        except Exception as exc:  # any failure on a probe text means an unusable model
            raise ModelError(
                f"model {spec.model} does not produce one fixed-size vector per text: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            ) from exc

    def with_transformer(
        self, transformer: Callable[[dict[str, np.ndarray]], np.ndarray], *, runtime: str
    ) -> Encoder:
        """A copy of this encoder whose first module is ``transformer``.

        ``transformer`` maps the padded ``input_ids``, ``attention_mask`` (and
        ``token_type_ids``) arrays to the token embeddings; the model's other
        modules still run on them in torch. The copy shares the weights and the
        tokenizer; this encoder is not changed (other users in the process, such as
        the per-process encoder cache, keep torch).
        """
        twin = copy.copy(self)
        twin._transformer = transformer
        twin._lanes = None
        twin.runtime = runtime
        return twin

    def _window(self, transformer: Any) -> int:
        """Tokens per sequence: the model's ``max_seq_length``, never past its positions."""
        limits = []
        st_max = getattr(self.model, "max_seq_length", None)
        if st_max and st_max < 1_000_000:
            limits.append(int(st_max))
        config = getattr(getattr(transformer, "auto_model", None), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            # RoBERTa, XLM-R and MPNet number positions from padding_idx + 1, so
            # their 514 positions hold 512 tokens; one more indexes past the table.
            limits.append(positions - _position_offset(transformer.auto_model))
        if self.spec.max_tokens:
            limits.append(self.spec.max_tokens)
        if not limits:
            raise ModelError(f"model {self.spec.model} states no maximum sequence length")
        return min(limits)

    def prompt(self, name: str) -> str:
        """The model's prompt called ``name``, or "" when it has none."""
        return self.prompts.get(name, "")

    def _probe_dim(self) -> int:
        vectors, _ = self.encode(["deltavec probe"])
        if vectors.ndim != 2 or vectors.shape[0] != 1 or not np.isfinite(vectors).all():
            raise ModelError(f"model {self.spec.model} does not produce one fixed-size vector")
        return int(vectors.shape[1])

    # -- tokenization -----------------------------------------------------------------

    def _tokenize(self, texts: Sequence[str], prompt: str) -> _Sequences:
        chunk = self.spec.long_text == "chunk"
        step = self.max_tokens - min(self.spec.chunk_overlap, self.max_tokens // 2)
        windows = self.spec.max_chunks if chunk else 1
        cap = (self.max_tokens + step * (windows - 1)) * _CHARS_PER_TOKEN_CAP
        # The prompt leads the text, as in sentence-transformers' encode(prompt=...);
        # in chunk mode it therefore leads the first window.
        prepared = [prompt + t[:cap] for t in texts]
        if not chunk:
            encoded = self.tokenizer(
                prepared,
                truncation=True,
                max_length=self.max_tokens,
                add_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=False,
                return_length=False,
            )
            ids = encoded["input_ids"]
            truncated = sum(len(s) >= self.max_tokens for s in ids)
            return _Sequences(ids, np.arange(len(ids)), truncated)
        encoded = self.tokenizer(
            prepared,
            truncation=True,
            max_length=self.max_tokens,
            stride=self.max_tokens - step,
            return_overflowing_tokens=True,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        owner = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
        keep = _first_n_per_owner(owner, windows)
        ids = [encoded["input_ids"][i] for i in keep]
        truncated = int(len(owner) - len(keep))
        return _Sequences(ids, owner[keep], truncated)

    # -- batching ---------------------------------------------------------------------

    def plan_batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Group sequence indices, longest first, under the padded-token budget."""
        order = np.argsort(-lengths, kind="stable")
        batches: list[np.ndarray] = []
        start = 0
        budget = self.batch_tokens
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            rows = max(1, budget // longest)
            batches.append(order[start : start + rows])
            start += rows
        return batches

    # -- the model ---------------------------------------------------------------------

    def encode(self, texts: Sequence[str], *, prompt: str = "") -> tuple[np.ndarray, EncodeStats]:
        """Embed texts, in input order.

        Args:
            texts: the texts.
            prompt: text put before each one (a model's ``passage: `` or ``query: ``).

        Returns:
            A float32 array of shape (len(texts), dim), and what the call did.
        """
        stats = EncodeStats(texts=len(texts))
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32), stats
        started = time.perf_counter()
        seqs = self._tokenize(texts, prompt)
        skip = self._prompt_length(prompt)
        stats.tokenize_seconds = time.perf_counter() - started
        stats.sequences = len(seqs.ids)
        stats.truncated = seqs.truncated
        stats.real_tokens = int(seqs.lengths.sum())
        batches = self.plan_batches(seqs.lengths)
        started = time.perf_counter()
        if self.lanes > 1 and len(batches) > 1:
            outputs = self._cpu_lanes().map(
                lambda batch: self._forward([seqs.ids[i] for i in batch], skip), batches
            )
        else:
            outputs = (
                self._forward_splitting_on_oom([seqs.ids[i] for i in batch], stats, skip)
                for batch in batches
            )
        pooled: np.ndarray | None = None
        for batch, out in zip(batches, outputs, strict=True):
            if pooled is None:
                pooled = np.empty((len(seqs.ids), out.shape[1]), dtype=np.float32)
            pooled[batch] = out
        stats.forward_seconds = time.perf_counter() - started
        stats.forward_passes += len(batches)
        stats.padded_tokens += sum(len(b) * int(seqs.lengths[b].max()) for b in batches)
        assert pooled is not None
        if len(seqs.ids) == len(texts) and np.array_equal(seqs.owner, np.arange(len(texts))):
            return pooled, stats
        return self._merge_windows(pooled, seqs, len(texts)), stats

    def _cpu_lanes(self) -> _CpuLanes:
        if self._lanes is None:
            self._lanes = _CpuLanes(self.lanes)
        return self._lanes

    def _merge_windows(self, pooled: np.ndarray, seqs: _Sequences, n: int) -> np.ndarray:
        # A document vector is the token-weighted mean of its windows' vectors,
        # renormalised when the model normalises.
        weights = seqs.lengths.astype(np.float32)
        sums = np.zeros((n, pooled.shape[1]), dtype=np.float32)
        np.add.at(sums, seqs.owner, pooled * weights[:, None])
        totals = np.bincount(seqs.owner, weights=weights, minlength=n).astype(np.float32)
        merged = sums / np.maximum(totals, 1e-12)[:, None]
        if self.normalizes:
            merged /= np.maximum(np.linalg.norm(merged, axis=1, keepdims=True), 1e-12)
        return merged

    def _prompt_length(self, prompt: str) -> int:
        """Prompt tokens a prompt-excluding Pooling leaves out (sentence-transformers' rule)."""
        if not prompt or not self._prompt_aware:
            return 0
        ids = self.tokenizer(prompt)["input_ids"]
        trailing = 1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0
        return len(ids) - trailing

    def _forward_splitting_on_oom(
        self, ids: list[list[int]], stats: EncodeStats, skip: int = 0
    ) -> np.ndarray:
        import torch

        try:
            return self._forward(ids, skip)
        except torch.OutOfMemoryError:
            if len(ids) == 1:
                raise
        # Retried here, after the handler: while it runs, the exception's traceback
        # holds the failed pass's frames and with them its activations, so
        # empty_cache() inside it frees little and every level of the split would
        # keep its own failed pass alive.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        stats.oom_splits += 1
        # The halves are extra forward passes; padding is counted once, per plan.
        stats.forward_passes += 1
        half = len(ids) // 2
        log.warning(
            "out of GPU memory on %d sequences; retrying as %d + %d",
            len(ids),
            half,
            len(ids) - half,
        )
        # Half the rows need half the activations; no row is dropped.
        return np.concatenate(
            [
                self._forward_splitting_on_oom(ids[:half], stats, skip),
                self._forward_splitting_on_oom(ids[half:], stats, skip),
            ]
        )

    def _forward(self, ids: list[list[int]], skip: int = 0) -> np.ndarray:
        """The model's vectors of one padded batch; safe to call from several threads.

        Args:
            ids: token ids per sequence.
            skip: leading prompt tokens a prompt-excluding Pooling leaves out.
        """
        import torch

        width = max(len(s) for s in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask).to(self.device, non_blocking=True),
        }
        if self.uses_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        if skip:
            features["prompt_length"] = skip
        if self._transformer is not None:
            return self._forward_after_transformer(features)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            # The model's own module stack: Transformer, Pooling, Dense, Normalize...
            vectors = self.model(features)["sentence_embedding"]
        # One host copy per forward pass: the GPU never holds more than one batch.
        out: np.ndarray = vectors.float().cpu().numpy()
        return out

    def _forward_after_transformer(self, features: dict[str, Any]) -> np.ndarray:
        """``_forward`` with the first module replaced by ``self._transformer``."""
        import torch

        assert self._transformer is not None
        arrays = {
            name: value.numpy()
            for name, value in features.items()
            if isinstance(value, torch.Tensor)
        }
        features["token_embeddings"] = torch.from_numpy(self._transformer(arrays))
        with torch.inference_mode():
            for module in list(self.model)[1:]:
                features = module(features)
        out: np.ndarray = features["sentence_embedding"].float().numpy()
        return out


class _CpuLanes:
    """Threads that each run whole forward passes with one torch intra-op thread.

    A small model's operators are too short to split well across cores: torch's
    intra-op threads meet at a barrier after every operator, and on a machine
    shared with other processes one descheduled thread stalls the rest. Running
    independent batches side by side (the GIL is released inside torch) keeps
    every core busy without that barrier; the threads x cores arithmetic is the
    same as Spark's one-task-per-core.
    """

    def __init__(self, lanes: int) -> None:
        import torch

        default = torch.get_num_threads()
        ready = threading.Barrier(lanes + 1)

        def start() -> None:
            # get_ first: torch sets a thread's count lazily from the process default,
            # which would undo the set_ below once the default is restored.
            torch.get_num_threads()
            torch.set_num_threads(1)
            ready.wait()

        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="deltavec-lane", initializer=start)
        for _ in range(lanes):
            self.pool.submit(lambda: None)
        ready.wait()
        # set_num_threads also changed the default for threads started later; restore it.
        torch.set_num_threads(default)

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> Iterator[_R]:
        """``fn`` over ``items`` on the lanes, results in the order of ``items``."""
        return self.pool.map(fn, items)


# -- failures, one row at a time -----------------------------------------------------------


@dataclass(frozen=True)
class RowFailure:
    index: int
    code: str
    message: str


class TransientEncodeError(RuntimeError):
    """The model failed in a way that says nothing about the rows (out of memory, a
    device error, a failure that did not repeat): the task fails and Spark retries
    it, and the rows keep the vectors they have until new ones land."""


# Messages of device failures torch raises as plain RuntimeErrors.
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN", "NCCL")


def is_transient(exc: BaseException) -> bool:
    """True for failures of the machine rather than of the input."""
    if isinstance(exc, MemoryError | OSError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the encoder
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if isinstance(exc, torch.OutOfMemoryError) or (
        accelerator is not None and isinstance(exc, accelerator)
    ):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_ERROR_MARKERS)


def encode_isolating_failures(
    encoder: Encoder, texts: Sequence[str], *, prompt: str = ""
) -> tuple[np.ndarray, list[RowFailure], EncodeStats]:
    """Embed texts; when a batch raises, bisect it so only the failing rows are lost.

    Only a row that fails deterministically is bad input: a single row that fails
    is tried once more, and is a failure only if it raises the same kind of error
    again. A transient failure (``is_transient``), or one that does not repeat the
    same way, is no verdict on the row.

    Args:
        encoder: the model.
        texts: the texts.
        prompt: text put before each one.

    Returns:
        Vectors (rows of failed texts are NaN), the failures, and the stats.

    Raises:
        TransientEncodeError: the model failed for a reason other than its input.
    """
    stats = EncodeStats()
    dim = encoder.dim
    out = np.full((len(texts), dim), np.nan, dtype=np.float32)
    failures: list[RowFailure] = []
    for lo, hi, vectors, error in _bisect(encoder, texts, 0, len(texts), stats, prompt):
        if vectors is not None:
            out[lo:hi] = vectors
        else:
            failures.append(RowFailure(lo, "encode_error", error or "unknown error"))
    return out, failures, stats


@dataclass(frozen=True)
class _Failed:
    """What is kept of a failed attempt: not the exception, whose traceback would
    keep the failed pass's frames (and tensors) alive while the rows are retried."""

    kind: type[BaseException]
    message: str


def _attempt(
    encoder: Encoder, texts: Sequence[str], prompt: str
) -> tuple[np.ndarray, EncodeStats] | _Failed:
    try:
        return encoder.encode(texts, prompt=prompt)
    except (MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # any model failure: sorted into bad input and transient below
        if is_transient(exc):
            raise TransientEncodeError(
                f"the model failed on {len(texts)} text(s) for a reason other than the "
                f"input ({_short(exc)}); failing the task so Spark retries it"
            ) from exc
        return _Failed(type(exc), _short(exc))


def _bisect(
    encoder: Encoder, texts: Sequence[str], lo: int, hi: int, stats: EncodeStats, prompt: str
) -> Iterator[tuple[int, int, np.ndarray | None, str | None]]:
    if lo >= hi:
        return
    result = _attempt(encoder, texts[lo:hi], prompt)
    if not isinstance(result, _Failed):
        stats.add(result[1])
        yield lo, hi, result[0], None
        return
    if hi - lo > 1:
        mid = (lo + hi) // 2
        yield from _bisect(encoder, texts, lo, mid, stats, prompt)
        yield from _bisect(encoder, texts, mid, hi, stats, prompt)
        return
    again = _attempt(encoder, texts[lo:hi], prompt)
    if not isinstance(again, _Failed):
        log.warning("row failed to embed once, then embedded: %s", result.message)
        stats.add(again[1])
        yield lo, hi, again[0], None
        return
    if again.kind is not result.kind:
        raise TransientEncodeError(
            f"a row failed to embed twice, in different ways ({result.message}; then "
            f"{again.message}); failing the task so Spark retries it"
        )
    log.warning("row failed to embed: %s", again.message)
    yield lo, hi, None, again.message


def _short(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc else "unknown error"
    return text if len(text) <= 300 else text[:297] + "..."


# -- helpers -------------------------------------------------------------------------------


def _first_n_per_owner(owner: np.ndarray, n: int) -> np.ndarray:
    keep = []
    seen: dict[int, int] = {}
    for i, o in enumerate(owner.tolist()):
        count = seen.get(o, 0)
        if count < n:
            keep.append(i)
            seen[o] = count + 1
    return np.asarray(keep, dtype=np.int64)


def _has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def _load_sentence_transformer(spec: EncoderSpec, device: str) -> Any:
    """``SentenceTransformer`` on ``spec.model``, weights in fp32, SDPA attention where it runs."""
    import torch
    from sentence_transformers import SentenceTransformer

    folder = Path(spec.model)
    model_kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if _has_safetensors(folder):
        # Pickle-based .bin weights can run code when loaded; a folder that has
        # safetensors must use them.
        model_kwargs["use_safetensors"] = True

    def load(kwargs: dict[str, Any]) -> Any:
        return SentenceTransformer(
            spec.model,
            device=device,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=True,
            model_kwargs=kwargs,
        )

    try:
        try:
            return load(model_kwargs)
        except ValueError as exc:
            if "attention" not in str(exc).lower():
                raise
            # An architecture without an SDPA kernel runs its own attention.
            return load({k: v for k, v in model_kwargs.items() if k != "attn_implementation"})
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(_load_failure(spec.model, exc)) from exc


def _describe(module: Any) -> str:
    """A module as the target records it: its kind, and for Pooling its modes."""
    kind = type(module).__name__
    if kind == "Pooling":
        modes = getattr(module, "get_pooling_mode_str", None)
        mode = modes() if callable(modes) else getattr(module, "pooling_mode", "?")
        prompt = "" if getattr(module, "include_prompt", True) else ",no-prompt"
        return f"Pooling({mode}{prompt})"
    if kind == "Dense":
        return f"Dense({module.in_features}->{module.out_features})"
    return kind


def _position_offset(model: Any) -> int:
    """Positions a model's embeddings skip before the first token (padding_idx + 1 for RoBERTa)."""
    import torch

    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(
            getattr(module, "position_embeddings", None), torch.nn.Embedding
        ):
            return padding_idx + 1
    return 0


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible to this process")
    return requested


def _default_batch_tokens(device: str) -> int:
    # Measured on MiniLM: a CPU runs fastest on small passes that stay in cache
    # (1,024 tokens beat 8,192 by a third); a GPU needs large ones to fill its cores.
    return 65536 if device.startswith("cuda") else 1024


def _pick_dtype(precision: str, device: str) -> torch.dtype:
    import torch

    # int8 quantizes the Linear layers; what stays in floating point runs in fp32.
    if precision in ("fp32", "int8") or (precision == "auto" and not device.startswith("cuda")):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _autocast(device: str, dtype: torch.dtype) -> Any:
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _load_failure(model: str, exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(model).is_dir() or model.startswith(("/", ".")):
        return f"model folder {model} cannot be loaded: {reason}"
    return (
        f"model {model!r} cannot be loaded: it is not a local folder and not in the "
        f"Hugging Face cache, or the Hub is unreachable ({reason})"
    )
