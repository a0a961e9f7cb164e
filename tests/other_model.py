"""A second real model for model-change tests: the default model cut to its first layers.

It loads and embeds like any Hugging Face folder, has the same vector size, and its
weights (so its identity and its vectors) differ from the default's. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def truncated_model(source: str, folder: Path, *, layers: int = 2) -> Path:
    """Copy the model at ``source`` into ``folder`` keeping only its first ``layers`` layers."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        if item.name == "model.safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, folder / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, folder / item.name)
    weights = load_file(str(Path(source) / "model.safetensors"))
    kept = {
        name: tensor
        for name, tensor in weights.items()
        if ".layer." not in name or int(name.split(".layer.")[1].split(".")[0]) < layers
    }
    save_file(kept, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
