"""What a search index holds in memory: blocks of rows, and one immutable state over them.

A ``Block`` is rows read together from the target's files; an ``IndexState`` is one
table version: its blocks, which of their rows are live, and which file each row
came from. A state is never changed once built (a refresh builds the next one), so
a query that took a state answers from one table version whatever else happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

# Masked-out rows cost a multiply each per query; past this share they are dropped.
COMPACT_AT = 0.25
# Each refresh that adds rows adds a block; merge them before queries pay for many.
MAX_BLOCKS = 16


@dataclass(frozen=True)
class Block:
    """Rows read together: a contiguous (n, dim) matrix, their keys and file ids, in one order."""

    matrix: np.ndarray
    keys: pa.Table
    files: np.ndarray  # int32 file id per row
    positions: np.ndarray  # int64 row number within its file, as deletion vectors count
    # uint64 per row: the first 16 hex digits of the row's text_hash, i.e. which
    # text its vector was made from. None: the files name no text hash.
    texts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.matrix.shape[0])


@dataclass
class FileRows:
    """What ``read_files`` returns: the rows, the ids given to their files, the models seen."""

    block: Block
    file_ids: dict[str, int] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class IndexState:
    """One table version in memory. Never changed once built: a refresh builds another.

    Slots number the rows of all blocks in order; ``live[slot]`` is False for
    rows of files that a later commit removed and for rows a deletion vector names.
    """

    version: int
    blocks: tuple[Block, ...]
    live: np.ndarray
    dead: int
    file_ids: dict[str, int]
    # Files whose rows were masked by a deletion vector: if one comes back
    # without its vector, rows may have to come back, which masks cannot do.
    masked_files: frozenset[str] = frozenset()

    @property
    def slots(self) -> int:
        return int(self.live.shape[0])

    def keys(self) -> pa.Table:
        import pyarrow as pa

        if len(self.blocks) == 1:
            return self.blocks[0].keys
        return pa.concat_tables([b.keys for b in self.blocks])


def text_fingerprints(state: IndexState) -> np.ndarray | None:
    """Every slot's text fingerprint (``Block.texts``), or None if a block has none."""
    if any(b.texts is None for b in state.blocks):
        return None
    parts = [b.texts for b in state.blocks if b.texts is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def vectors_at(state: IndexState, slots: np.ndarray) -> np.ndarray:
    """The vectors of sorted ``slots`` of ``state``, in that order."""
    parts, offset = [], 0
    for block in state.blocks:
        lo, hi = np.searchsorted(slots, [offset, offset + len(block)])
        parts.append(block.matrix[slots[lo:hi] - offset])
        offset += len(block)
    dim = state.blocks[0].matrix.shape[1] if state.blocks else 0
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def needs_compaction(state: IndexState) -> bool:
    return state.dead > COMPACT_AT * max(state.slots, 1) or len(state.blocks) > MAX_BLOCKS


def compact(state: IndexState) -> IndexState:
    """The same rows without the masked-out ones, in one block."""
    import pyarrow as pa

    dim = state.blocks[0].matrix.shape[1] if state.blocks else 0
    # Filled in place: masking each block and then concatenating the parts
    # would hold every live vector twice at once (150 MB more per 100,000 x 384).
    matrix = np.empty((int(state.live.sum()), dim), np.float32)
    keys, files, positions, texts = [], [], [], []
    hashed = all(block.texts is not None for block in state.blocks)
    offset = filled = 0
    for block in state.blocks:
        live = state.live[offset : offset + len(block)]
        offset += len(block)
        kept = int(live.sum())
        np.compress(live, block.matrix, axis=0, out=matrix[filled : filled + kept])
        filled += kept
        keys.append(block.keys.filter(pa.array(live)))
        files.append(block.files[live])
        positions.append(block.positions[live])
        if block.texts is not None:
            texts.append(block.texts[live])
    merged = Block(
        matrix=matrix,
        keys=pa.concat_tables(keys).combine_chunks(),
        files=np.concatenate(files),
        positions=np.concatenate(positions),
        texts=np.concatenate(texts) if hashed and texts else None,
    )
    blocks = (merged,) if len(merged) else ()
    live = np.ones(len(merged), dtype=bool)
    return IndexState(state.version, blocks, live, 0, state.file_ids, state.masked_files)
