"""Tiny random-weight models, saved the way sentence-transformers saves them.

Each covers one architecture or module mix deltavec claims to run exactly as
sentence-transformers does (hidden size 32, two layers, as sentence-transformers'
and transformers' own tests build them). They share the default model's
WordPiece vocabulary, so nothing is downloaded; the architecture, not the
tokenizer, is what each case is about. One is also laid out as a Hugging Face
cache entry, to be loaded by its Hub id with the Hub offline.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_ID = "deltavec-tests/tiny-bge"
# A made-up commit: the cache layout needs one, the Hub never sees it.
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@dataclass(frozen=True)
class ZooModel:
    """One tiny model: its name, what deltavec is given (a folder or a Hub id), its window."""

    case: str
    name: str
    folder: Path
    window: int
    document_prompt: str | None = None


def build_zoo(root: Path, default_model: str, hf_home: Path) -> list[ZooModel]:
    """Build every model under ``root``; the Hub one goes into ``hf_home``'s cache."""
    import torch

    torch.manual_seed(15)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_from = default_model
    zoo = [
        _bert(root, tokenizer_from, "bge-cls-normalize", pooling="cls", normalize=True),
        _bert(root, tokenizer_from, "mean-no-normalize", pooling="mean", normalize=False),
        _roberta_family(root, tokenizer_from, "mpnet-514-positions", "mpnet"),
        _roberta_family(root, tokenizer_from, "xlm-roberta", "xlm-roberta", window=48),
        _bert(root, tokenizer_from, "labse-dense", pooling="cls", normalize=True, dense=16),
        _bert(root, tokenizer_from, "max-pooling", pooling="max", normalize=False),
        _gpt2_last_token(root, tokenizer_from),
        _bert(
            root,
            tokenizer_from,
            "prompts",
            pooling="mean",
            normalize=True,
            prompts={"query": "query: ", "document": "passage: "},
            default_prompt="query",
        ),
        _bert(root, tokenizer_from, "lowercase", pooling="mean", normalize=True, lowercase=True),
    ]
    zoo.append(_into_hub_cache(zoo[0], hf_home))
    return zoo


def _tokenizer(
    tokenizer_from: str, *, cased: bool = False, pad: str = "[PAD]", limit: int = 512
) -> Any:
    from tokenizers.normalizers import BertNormalizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    if cased:
        tokenizer.backend_tokenizer.normalizer = BertNormalizer(lowercase=False)
    tokenizer.pad_token = pad
    tokenizer.model_max_length = limit
    return tokenizer


def _save(
    folder: Path,
    hf_folder: Path,
    *,
    pooling: str,
    normalize: bool,
    window: int | None,
    lowercase: bool = False,
    dense: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt: str | None = None,
) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(hf_folder), max_seq_length=window, do_lower_case=lowercase)
    modules: list[Any] = [
        transformer,
        Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling),
    ]
    if dense:
        modules.append(
            Dense(
                transformer.get_embedding_dimension(),
                dense,
                activation_function=torch.nn.Tanh(),
            )
        )
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(
        modules=modules, prompts=prompts, default_prompt_name=default_prompt, device="cpu"
    )
    model.save(str(folder))
    shutil.rmtree(hf_folder)
    if lowercase:
        # The older way, still common on the Hub: a cased tokenizer, and
        # do_lower_case in sentence_bert_config.json (sentence-transformers 6 would
        # bake the lowercasing into tokenizer.json instead).
        tokenizer_file = folder / "tokenizer.json"
        tokenizer = json.loads(tokenizer_file.read_text())
        tokenizer["normalizer"] = {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": False,
        }
        tokenizer_file.write_text(json.dumps(tokenizer))
        config_file = folder / "sentence_bert_config.json"
        config = json.loads(config_file.read_text())
        config.update(do_lower_case=True, max_seq_length=window)
        config_file.write_text(json.dumps(config))
    if window is None:
        # As many published models do: no max_seq_length, so the window is the model's own.
        config_file = folder / "sentence_bert_config.json"
        config = json.loads(config_file.read_text())
        config.pop("max_seq_length", None)
        config_file.write_text(json.dumps(config))


def _bert(
    root: Path,
    tokenizer_from: str,
    case: str,
    *,
    pooling: str,
    normalize: bool,
    window: int = 40,
    lowercase: bool = False,
    dense: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt: str | None = None,
) -> ZooModel:
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer(tokenizer_from, cased=lowercase)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        intermediate_size=37,
        max_position_embeddings=128,
        initializer_range=0.2,
        **TINY,
    )
    hf_folder = root / f"{case}-hf"
    BertModel(config).save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    folder = root / case
    _save(
        folder,
        hf_folder,
        pooling=pooling,
        normalize=normalize,
        window=window,
        lowercase=lowercase,
        dense=dense,
        prompts=prompts,
        default_prompt=default_prompt,
    )
    document = (prompts or {}).get("document")
    return ZooModel(case, str(folder), folder, window, document)


def _roberta_family(
    root: Path, tokenizer_from: str, case: str, model_type: str, *, window: int | None = None
) -> ZooModel:
    from transformers import AutoConfig, AutoModel

    # Pad id 1, as in RoBERTa: positions start at padding_idx + 1 = 2, so 514
    # position embeddings hold 512 tokens. No tokenizer limit either.
    tokenizer = _tokenizer(tokenizer_from, pad="[unused0]", limit=int(1e30))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=tokenizer.vocab_size,
        intermediate_size=37,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        initializer_range=0.2,
        **TINY,
    )
    hf_folder = root / f"{case}-hf"
    AutoModel.from_config(config).save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    folder = root / case
    _save(folder, hf_folder, pooling="mean", normalize=True, window=window)
    return ZooModel(case, str(folder), folder, window or 512)


def _gpt2_last_token(root: Path, tokenizer_from: str) -> ZooModel:
    from transformers import GPT2Config, GPT2Model

    tokenizer = _tokenizer(tokenizer_from)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    hf_folder = root / "gpt2-last-token-hf"
    GPT2Model(config).save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    folder = root / "gpt2-last-token"
    _save(folder, hf_folder, pooling="lasttoken", normalize=True, window=None)
    return ZooModel("gpt2-last-token", str(folder), folder, 64)


def _into_hub_cache(model: ZooModel, hf_home: Path) -> ZooModel:
    """``model``'s files as the Hub cache holds ``HUB_ID``: models--org--name/snapshots/<commit>."""
    repo = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_COMMIT
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(model.folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return ZooModel("hub-id", HUB_ID, snapshot, model.window, model.document_prompt)
