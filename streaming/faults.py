"""Test-only fault injection at named points of a micro-batch.

Set ``DELTAVEC_TEST_FAULTS`` to a comma-separated list of ``point:action[:probability]``:

* points: ``before_merge`` (embedded, nothing written yet), ``between_writes``
  (the MERGE of existing keys committed, the append of new keys not yet),
  ``after_merge`` (target and quarantine committed, Spark's checkpoint commit not
  yet written: the window where a crash makes Spark replay a batch Delta already
  holds), and ``reembed_chunk`` / ``before_swap`` in ``deltavec reembed``;
* actions: ``kill`` sends SIGKILL to this process (a crashed driver), ``raise``
  raises ``InjectedFault`` once per process (a failed batch).

Unset, every call is a no-op. Production configs never set it.
"""

from __future__ import annotations

import os
import random
import signal
import sys

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
