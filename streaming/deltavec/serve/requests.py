"""The JSON bodies the server accepts, with their bounds (pydantic checks them at the door)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A query is a sentence or a paragraph, not a document: 4,000 characters is
# well past any model's 512-token window and keeps one request's work bounded.
MAX_QUERY_CHARS = 4000
MAX_FILTER_CHARS = 2000
MAX_COLUMNS = 64


class SearchRequest(BaseModel):
    """``POST /search``."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(max_length=MAX_QUERY_CHARS)
    k: int = Field(default=10, ge=1)
    mode: Literal["vector", "keyword", "hybrid"] = "vector"
    where: str | None = Field(default=None, max_length=MAX_FILTER_CHARS)
    columns: list[str] = Field(default_factory=list, max_length=MAX_COLUMNS)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is empty")
        return value


class EmbedRequest(BaseModel):
    """``POST /embed``: texts in, the target model's query vectors out."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1)


class OpenAIEmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` in OpenAI's shape; other fields clients send are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None
    # The openai Python client asks for base64 unless told otherwise.
    encoding_format: Literal["float", "base64"] = "float"

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
