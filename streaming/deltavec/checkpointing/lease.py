"""An exclusive lease on a checkpoint, so two jobs never write through one checkpoint.

Spark itself does not stop a second query on the same checkpoint from starting; two
of them would interleave offsets and commits and feed the target the same batches
twice. deltavec therefore takes a lease before it touches a table:

* The lease is a numbered file, ``<checkpoint>/_deltavec/lease/<generation>.json``.
  The job holding the highest generation owns the checkpoint. Taking the lease means
  creating the next generation with an *exclusive* create, so of two jobs racing for
  it exactly one wins, and nothing is ever deleted to take it (a delete-then-create
  scheme lets two jobs each delete the other's fresh file).
* The owner rewrites its file every ``ttl / 3`` seconds (a heartbeat with a counter
  and a wall-clock time). A second job that finds a lease being renewed is refused
  with one line naming the owner.
* A lease is taken over at once when its owner cleared it on exit, or when the
  owner ran on this host and its process is gone (a SIGKILLed job restarts without
  waiting). Otherwise only once its file has not changed for ``ttl`` seconds as the
  taking process watches it, by its own monotonic clock: no wall clocks of two
  hosts are compared, so a clock skew cannot hand over a live lease. A file that
  cannot be parsed (being written by a store without atomic writes) is watched the
  same way, never taken for free.
* Lease files are written whole: elsewhere first, then renamed (or, locally,
  hard-linked) into place, never replacing an existing generation.
* An owner that finds a higher generation than its own has lost the lease (it was
  paused for longer than ``ttl``); it stops before its next micro-batch.

Guarantees: the no-replace rename (a hard link locally) is atomic on local file
systems, HDFS and ABFS with a hierarchical namespace, so there the lease is
exclusive. S3A's and GCS's renames are a copy and a delete: two jobs started
within the same instant could both win there, though a job started while another
one renews its lease is always refused. The sink checks the lease before each
write and stops a batch whose job lost it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deltavec.checkpointing.lease_stores import LeaseStore
from deltavec.errors import CheckpointError
from deltavec.runtime.processes import process_alive, process_start

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the job holding it."""

    owner: str
    host: str
    pid: int
    started: str | None
    renewed_at: float
    beat: int
    released: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Holder | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                owner=str(data["owner"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=data.get("started"),
                renewed_at=float(data["renewed_at"]),
                beat=int(data["beat"]),
                released=bool(data.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


class CheckpointLease:
    """The lease one job holds on one checkpoint.

    Args:
        store: the lease folder (see ``store_for``).
        location: the checkpoint, for messages.
        ttl_s: seconds without a heartbeat after which a lease is stale.
        on_lost: called (from the heartbeat thread) if another job takes the lease over.
    """

    def __init__(
        self,
        store: LeaseStore,
        *,
        location: str,
        ttl_s: float = DEFAULT_TTL_S,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.location = location
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = process_start(self.pid)
        self.generation: int | None = None
        self._beat = 0
        self._lost = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------

    def acquire(self, *, wait_s: float | None = None) -> None:
        """Take the lease, or raise ``CheckpointError`` naming the job that holds it.

        Args:
            wait_s: how long to watch a lease held on another host for a heartbeat
                before deciding it is stale; ``ttl`` by default.
        """
        wait = self.ttl_s if wait_s is None else wait_s
        started: float | None = None  # when this process first saw a lease file
        # What this process saw in each generation's file, and since when, by its
        # own clock: another host's wall clock says nothing about whether it is
        # alive (a skew of a minute would make a live lease look stale).
        observed: dict[int, tuple[str | None, float]] = {}
        while True:
            current = self._highest()
            if current is None:
                if self._create(1):
                    return
                continue
            generation, text = current
            holder = Holder.parse(text)
            if holder is not None and holder.owner == self.owner:
                self.generation = generation
                return
            now = time.monotonic()
            started = now if started is None else started
            seen = observed.get(generation)
            changed = seen is not None and seen[0] != text
            if seen is None or changed:
                observed[generation] = (text, now)
            quiet_s = now - observed[generation][1]
            if self._is_free(holder) or quiet_s >= self.ttl_s:
                if holder is not None and not holder.released:
                    log.warning(
                        "checkpoint %s: taking over the stale lease of %s (no heartbeat for %.0fs)",
                        self.location,
                        holder.describe(),
                        quiet_s,
                    )
                if self._create(generation + 1):
                    return
                continue
            # An unreadable file (a lease being written) is watched like any other:
            # it is neither free nor, until it parses, a holder to name.
            if holder is not None and (
                changed or holder.host == self.host or now - started >= wait
            ):
                raise CheckpointError(
                    f"checkpoint {self.location} is in use by another deltavec job "
                    f"({holder.describe()}); "
                    "stop that job first, or give this one its own checkpoint.location"
                )
            if holder is None and now - started >= max(wait, self.ttl_s) + self.ttl_s:
                raise CheckpointError(
                    f"checkpoint {self.location} has a lease file that cannot be read "
                    f"({_name(generation)}); stop the job holding it, or remove the file"
                )
            time.sleep(min(1.0, self.ttl_s / 6))

    def start_heartbeat(self) -> None:
        """Renew the lease every ``ttl / 3`` seconds on a daemon thread until ``release``."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._heartbeat, name="deltavec-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and give the lease back, so the next job starts at once."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
            self._thread = None
        if self.generation is None or self._lost.is_set():
            return
        current = self._highest()
        if current is not None and current[0] == self.generation:
            # Marked released rather than deleted: the generation number must keep
            # growing, or a job still reading the old number could create it again.
            self.store.overwrite(_name(self.generation), self._text(released=True))
        self._prune(below=self.generation)
        self.generation = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    # -- internals -------------------------------------------------------------------

    def _text(self, *, released: bool = False) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "renewed_at": time.time(),
                "beat": self._beat,
                "released": released,
            }
        )

    def _create(self, generation: int) -> bool:
        if not self.store.create_exclusive(_name(generation), self._text()):
            return False
        self.generation = generation
        self._prune(below=generation)
        log.info("checkpoint %s: lease %d taken by %s", self.location, generation, self.owner)
        return True

    def _highest(self) -> tuple[int, str | None] | None:
        generations = sorted(
            int(name.removesuffix(".json"))
            for name in self.store.names()
            if name.removesuffix(".json").isdigit()
        )
        if not generations:
            return None
        top = generations[-1]
        return top, self.store.read(_name(top))

    def _is_free(self, holder: Holder | None) -> bool:
        """Free without waiting: given back, or held by a process of this host that is gone."""
        if holder is None:
            return False
        if holder.released:
            return True
        return holder.host == self.host and not process_alive(holder.pid, holder.started)

    def _prune(self, *, below: int) -> None:
        # Old generations only tell history; keep the folder small.
        for name in self.store.names():
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) < below - 1:
                with contextlib.suppress(Exception):
                    self.store.delete(name)

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 3
        while not self._halt.wait(interval):
            try:
                current = self._highest()
                if current is None or current[0] != self.generation:
                    self._lose(Holder.parse(current[1]) if current else None)
                    return
                self._beat += 1
                assert self.generation is not None
                self.store.overwrite(_name(self.generation), self._text())
            except Exception:
                log.warning("checkpoint %s: lease renewal failed", self.location, exc_info=True)

    def _lose(self, holder: Holder | None) -> None:
        self._lost.set()
        who = holder.describe() if holder else "nobody"
        message = (
            f"checkpoint {self.location}: lease lost to {who}; "
            "this job stops before its next micro-batch"
        )
        log.error(message)
        if self.on_lost is not None:
            self.on_lost(message)


def _name(generation: int) -> str:
    return f"{generation:020d}.json"
