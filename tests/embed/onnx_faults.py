"""A fault for the ONNX query runtime: real sessions whose token embeddings drift."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import pytest

from deltavec.embed import onnx_queries


def drift_onnx_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ONNX Runtime session made from now on is real but answers a little off
    (a wrong graph), and earlier exports are forgotten."""
    real = onnx_queries._session

    def drifting(graph: bytes, threads: int) -> Any:
        session = real(graph, threads)

        class Drifting:
            def get_inputs(self) -> Any:
                return session.get_inputs()

            def run(self, names: Any, feeds: Any) -> Any:
                hidden = session.run(names, feeds)[0]
                return [hidden + np.float32(0.05) * np.sign(hidden)]

        return Drifting()

    monkeypatch.setattr(onnx_queries, "_session", drifting)
    monkeypatch.setattr(onnx_queries, "_made", weakref.WeakKeyDictionary())
