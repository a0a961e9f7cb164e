"""The project's exception tree.

Every error a user can cause or fix derives from ``DeltavecError``; the CLI prints
its message as one line and exits non-zero. Anything else is a bug and keeps its
stack trace.
"""

from __future__ import annotations


class DeltavecError(Exception):
    """Root of every error deltavec raises on purpose."""


class ConfigError(DeltavecError):
    """The configuration file or an environment override is wrong."""


class SourceError(DeltavecError):
    """The source table is missing, is not Delta, or lacks a configured column."""


class TargetError(DeltavecError):
    """The target table exists but cannot take this job's vectors."""


class ModelError(DeltavecError):
    """The model cannot be loaded or does not produce fixed-size vectors."""


class CheckpointError(DeltavecError):
    """The checkpoint belongs to another job, another source, or is in use."""


class SchemaChangedError(DeltavecError):
    """The source schema changed under a running job."""


class SearchError(DeltavecError):
    """A search cannot be answered: a bad filter, a missing source, an optional library."""


class MetricsError(DeltavecError):
    """The metrics endpoint cannot be served (its address is in use or not this host's)."""


class ModelChangedError(TargetError):
    """The target's vectors now come from another model (a reembed): open it again.

    Attributes:
        identity: the model identity the target records now.
    """

    def __init__(self, message: str, identity: str) -> None:
        super().__init__(message)
        self.identity = identity
