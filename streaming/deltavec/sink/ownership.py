"""Which checkpoint owns a target, so that one lease guards every writer of it.

The checkpoint lease lets one job at a time write through one checkpoint, and the
quarantine retry and the re-embedding take that same lease. A second checkpoint on
the same target (a copied config, a checkpoint folder moved or renamed) would
bring a lease of its own: its job would find the same keys missing from the
target and append them too, leaving them twice. So the target records the
checkpoint that owns it in the table property ``deltavec.checkpoint``, set when
the job creates the target (or, for a target written before deltavec recorded
it, on the job's first start), and every writer with another checkpoint is
refused before it writes anything.

Handing a target to another checkpoint is a deliberate act: stop the old job for
good, then unset the property (the refusal says how). The new checkpoint starts
from the source's beginning, and skip-unchanged keeps that cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from deltavec.errors import TargetError
from deltavec.runtime import tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from deltavec.config import TableRef

OWNER_PROPERTY = "deltavec.checkpoint"


def checkpoint_id(location: str) -> str:
    """The checkpoint's location as the target records it.

    A local folder is made absolute (a relative location means a different folder
    from another working directory, so a different checkpoint); ``file:`` URIs and
    trailing slashes name the same folder as the plain path.
    """
    path = location.rstrip("/") or "/"
    if path.startswith("file:"):
        path = "/" + path[len("file:") :].lstrip("/")
    if "://" in path:
        return path
    return os.path.abspath(path)


def check_owner(ref: TableRef, properties: dict[str, str], location: str) -> None:
    """Raise TargetError unless the target is free or owned by ``location``."""
    owner = properties.get(OWNER_PROPERTY)
    mine = checkpoint_id(location)
    if owner and owner != mine:
        raise TargetError(
            f"target {ref.name} is written by the job of checkpoint {owner}, not {mine}; "
            f"set checkpoint.location = {owner!r}, or, if that job is gone for good, "
            f"hand the target over with ALTER TABLE {ref.sql_name} UNSET TBLPROPERTIES "
            f"('{OWNER_PROPERTY}')"
        )


def check(spark: SparkSession, ref: TableRef, location: str) -> None:
    """Refuse a writer whose checkpoint does not own the (existing) target."""
    check_owner(ref, tables.properties(spark, ref), location)


def claim(spark: SparkSession, ref: TableRef, location: str) -> None:
    """Record ``location`` as the target's owner if it records none yet.

    Called with the checkpoint's lease held. The property is read back after it is
    set, so of two checkpoints claiming one target at once, the one that lost
    refuses to go on.
    """
    properties = tables.properties(spark, ref)
    check_owner(ref, properties, location)
    if OWNER_PROPERTY not in properties:
        value = checkpoint_id(location).replace("'", "''")
        spark.sql(f"ALTER TABLE {ref.sql_name} SET TBLPROPERTIES ('{OWNER_PROPERTY}' = '{value}')")
        check(spark, ref, location)
