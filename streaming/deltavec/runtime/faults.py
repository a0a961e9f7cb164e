"""Test-only fault injection at named points of a micro-batch.

Set ``DELTAVEC_TEST_FAULTS`` to a comma-separated list of ``point:action[:probability]``:

* points: ``before_merge`` (embedded, nothing written yet), ``between_writes``
  (the MERGE of existing keys committed, the append of new keys not yet),
  ``after_merge`` (target and quarantine committed, Spark's checkpoint commit not
  yet written: the window where a crash makes Spark replay a batch Delta already
  holds), ``warm_snapshot`` (the sink's background read of the version a batch
  just wrote, off the batch's path), and ``reembed_chunk`` / ``before_swap`` in
  ``deltavec reembed``;
* actions: ``kill`` sends SIGKILL to this process (a crashed driver), ``raise``
  raises ``InjectedFault`` once per process (a failed batch).

Unset, every call is a no-op. Production configs never set it. ``poisoned`` below
injects a model failure for chosen rows on the workers.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Sequence
from typing import Any, TypeVar, cast

T = TypeVar("T")

ENV = "DELTAVEC_TEST_FAULTS"
_fired: set[str] = set()


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault injects."""


def maybe_fail(point: str) -> None:
    spec = os.environ.get(ENV, "")
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = entry.partition(":")
        action, _, chance = rest.partition(":")
        if name != point or random.random() >= float(chance or 1.0):
            continue
        if action == "kill":
            # One line first, so a test can tell where the process died.
            print(f"deltavec-fault: kill at {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise" and point not in _fired:
            _fired.add(point)
            raise InjectedFault(f"injected fault at {point}")


POISON_ENV = "DELTAVEC_TEST_POISON"
# Texts holding this marker make the model run out of (GPU) memory, even alone.
OUT_OF_MEMORY_ENV = "DELTAVEC_TEST_OUT_OF_MEMORY"


class _PoisonedEncoder:
    """An encoder whose ``encode`` raises for any batch holding the poison marker
    (a failure of the input), or the out-of-memory marker (a failure of the machine)."""

    def __init__(self, encoder: Any, marker: str | None, out_of_memory: str | None) -> None:
        self._encoder = encoder
        self._marker = marker
        self._out_of_memory = out_of_memory

    def __getattr__(self, name: str) -> Any:
        # Everything but encode (dim, device, dtype, ...) is the real encoder's.
        return getattr(self._encoder, name)

    def encode(self, texts: Sequence[str], *, prompt: str = "") -> Any:
        if self._out_of_memory and any(self._out_of_memory in text for text in texts):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if self._marker and any(self._marker in text for text in texts):
            raise InjectedFault(f"injected model failure on a text containing {self._marker!r}")
        return self._encoder.encode(texts, prompt=prompt)


def poisoned(encoder: T) -> T:
    """``encoder`` itself, or (with ``DELTAVEC_TEST_POISON`` set) one that fails on marked texts.

    Spark's Python workers see the variable through ``spark.executorEnv.*`` (or
    ``SparkContext.environment``), so a test can make one row fail inside the
    model and watch the batch isolate it.
    """
    marker = os.environ.get(POISON_ENV)
    out_of_memory = os.environ.get(OUT_OF_MEMORY_ENV)
    if not (marker or out_of_memory):
        return encoder
    return cast(T, _PoisonedEncoder(encoder, marker, out_of_memory))
