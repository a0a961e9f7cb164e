"""Keep what the server has loaded out of Python's full garbage collections.

A full collection walks every container object the collector tracks while it
holds the GIL, so no query is answered meanwhile. A loaded server tracks about
540,000, nearly all the functions, types and dicts of the libraries it imported
(torch, transformers, FastAPI, ...), and walking them took 0.3 s on the 2-core VM.
The objects each refresh builds set one off every 10-15 s under load, and one of
them inside a 30 s ``bench-serve`` window put 55 of 4,500 vector queries past
60 ms by itself. Frozen (``gc.freeze``), those objects are skipped, and a full
collection of what is left took 0.5-5.6 ms.

Frozen objects are still freed when their last reference goes, but garbage
cycles among them never are: a replaced model (a reembed) is often such a cycle,
so a model change unfreezes everything and freezes again only once the old
model has been collected.
"""

from __future__ import annotations

import gc
import logging
import weakref

log = logging.getLogger(__name__)

# Refreshes to wait for a replaced model to be collected before freezing anyway:
# whatever still holds it then would keep it frozen or not.
MAX_WAITS = 10


class LoadedObjectFreezer:
    """Freezes what is loaded; after a model change, waits for the old one to go.

    A process-wide setting: only a server that owns its process uses it.
    """

    def __init__(self) -> None:
        self._replaced: weakref.ref[object] | None = None
        self._waits = 0

    def loaded(self) -> None:
        """The target is loaded: collect what loading left, freeze the rest."""
        gc.collect()
        gc.freeze()

    def model_replaced(self, old: object) -> None:
        """``old`` (the replaced model's search) is no longer served."""
        gc.unfreeze()
        self._replaced = weakref.ref(old)
        self._waits = 0

    def refreshed(self) -> None:
        """After each refresh: freeze again once the replaced model is collected.

        One full collection per refresh until then; the replaced model's query
        threads exit as soon as they are idle, so it is usually the first.
        """
        if self._replaced is None:
            return
        gc.collect()
        self._waits += 1
        if self._replaced() is not None and self._waits < MAX_WAITS:
            return
        if self._replaced() is not None:
            log.warning("the replaced model is still referenced after %d refreshes", self._waits)
        self._replaced = None
        gc.freeze()
