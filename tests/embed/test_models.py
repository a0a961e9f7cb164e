"""What a target records about its vectors: identities old targets keep, and int8's own."""

from __future__ import annotations

import json

from deltavec.embed.models import VectorSettings, changed_setting

# A target as deltavec wrote it before int8 existed (the default model, the demo template).
BEFORE_INT8 = VectorSettings(
    max_tokens=256,
    modules="Transformer>Pooling(mean)>Normalize",
    lowercase=True,
    long_text="truncate",
    chunk_overlap=None,
    max_chunks=None,
    document_prompt="",
    template="{title} [SEP] {abstract}",
)


def test_floating_point_targets_keep_their_fingerprint_and_int8_gets_another() -> None:
    int8 = VectorSettings(**{**BEFORE_INT8.__dict__, "precision": "int8"})

    # The JSON and fingerprint deltavec wrote before this field existed, byte for byte.
    assert "precision" not in BEFORE_INT8.to_json()
    assert BEFORE_INT8.fingerprint == "bc786c2750a8"
    assert json.loads(int8.to_json())["precision"] == "int8"
    assert int8.fingerprint != BEFORE_INT8.fingerprint


def test_a_changed_precision_is_named_both_ways() -> None:
    int8 = VectorSettings(**{**BEFORE_INT8.__dict__, "precision": "int8"})
    fp32_recorded = json.loads(BEFORE_INT8.to_json())
    int8_recorded = json.loads(int8.to_json())

    assert changed_setting(fp32_recorded, BEFORE_INT8) is None
    assert changed_setting(fp32_recorded, int8) == (
        "model.precision = floating point (fp32, or fp16/bf16 on a GPU), but this job uses 'int8'"
    )
    assert changed_setting(int8_recorded, BEFORE_INT8) == (
        "model.precision = 'int8', but this job uses floating point (fp32, or fp16/bf16 on a GPU)"
    )
