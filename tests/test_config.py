"""The config file: typed, validated once, overridable from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltavec.config import load_config, template_columns
from deltavec.errors import ConfigError
from tests.conftest import write_config


def test_loads_the_shipped_config() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "deltavec.toml")
    assert config.source.key == ["id"]
    assert config.source.text_columns == ["title", "abstract"]
    assert config.model.name == "default"
    assert config.metrics.host == "127.0.0.1"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAVEC_SOURCE__PATH", "s3a://bucket/papers")
    monkeypatch.setenv("DELTAVEC_SOURCE__KEY", "doc_id,lang")
    monkeypatch.setenv("DELTAVEC_MODEL__MAX_TOKENS", "128")
    config = load_config(write_config(tmp_path))
    assert config.source.path == "s3a://bucket/papers"
    assert config.source.key == ["doc_id", "lang"]
    assert config.model.max_tokens == 128


def test_relative_paths_become_absolute_and_quarantine_sits_next_to_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write_config(tmp_path, target={"path": "out/vectors"}))
    assert config.target.path == str(tmp_path / "out" / "vectors")
    assert config.target.quarantine.path == str(tmp_path / "out" / "vectors_quarantine")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    with pytest.raises(ValueError):
        config.model.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"source": {"colour": "blue"}}, "source.colour: unknown key (valid: path, table, key,"),
        ({"model": {"max_tokens": "many"}}, "model.max_tokens: Input should be a valid integer"),
        ({"source": {"mode": "sometimes"}}, "source.mode: Input should be 'append' or 'changes'"),
        ({"source": {"template": "no fields"}}, "source.template: the template names no column"),
        ({"source": {"template": "{title!r}"}}, "must be a plain column name"),
        ({"source": {"table": "db.papers"}}, "set exactly one of 'path' or 'table'"),
        (
            {"model": {"device": "cuda", "precision": "int8"}},
            "model: precision 'int8' runs on a CPU only; set device = 'cpu'",
        ),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, sections: dict[str, dict[str, object]], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, **sections))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[source\npath = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)


def test_template_columns_in_first_use_order() -> None:
    assert template_columns("{title} [SEP] {abstract} ({title})") == ["title", "abstract"]
