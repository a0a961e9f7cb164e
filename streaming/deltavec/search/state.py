"""What a search index holds in memory: blocks of rows, and one immutable state over them.

A ``Block`` is the rows of whole files of the target; an ``IndexState`` is one
table version: its blocks, which of their rows are live, and which file each row
came from. A state is never changed once built (a refresh builds the next one), so
a query that took a state answers from one table version whatever else happens,
and a block is never changed either: the next state shares the blocks it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

# Masked-out rows cost a multiply each per query; past this share of a block's
# rows, the block is written again without them.
COMPACT_AT = 0.25
# Each refresh that adds rows adds a block, and every block costs an exact query
# a matrix product of its own; past this many, blocks are merged.
MAX_BLOCKS = 8
# A table is held in blocks of whole files, about 1/TARGET_BLOCKS of its rows
# each and at least BLOCK_ROWS: a file a MERGE rewrites then dies in one
# block, and compacting that block copies a slice of the table, not all of it.
# Half of MAX_BLOCKS: a table just loaded has room for refreshes' blocks.
TARGET_BLOCKS = MAX_BLOCKS // 2
BLOCK_ROWS = 16_384


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


def first_slots(state: IndexState) -> dict[int, int]:
    """The slot of each block's first row in ``state``, by the block's ``id``."""
    starts, offset = {}, 0
    for block in state.blocks:
        starts[id(block)] = offset
        offset += len(block)
    return starts


def block_rows(rows: int) -> int:
    """The rows a block of a table of ``rows`` rows is cut to hold (whole files)."""
    return max(BLOCK_ROWS, -(-rows // TARGET_BLOCKS))


def needs_compaction(state: IndexState) -> bool:
    starts = first_slots(state)
    shares = (_dead_share(state, starts[id(b)], len(b)) for b in state.blocks)
    return len(state.blocks) > MAX_BLOCKS or any(share > COMPACT_AT for share in shares)


def compact(state: IndexState) -> IndexState:
    """The same rows, blocks with many masked-out rows written again without them.

    A block whose share of masked-out rows passed ``COMPACT_AT`` is copied
    without them (and dropped if none is live); others stay as they are, the
    same objects, so the approximate index keeps their rows where they lie. Past
    ``MAX_BLOCKS`` blocks, the two adjacent ones with fewest live rows become one.
    """
    blocks: list[Block] = []
    lives: list[np.ndarray] = []
    starts = first_slots(state)
    for block in state.blocks:
        lo = starts[id(block)]
        live = state.live[lo : lo + len(block)]
        if _dead_share(state, lo, len(block)) > COMPACT_AT:
            block = _live_rows([block], [live])
            live = np.ones(len(block), bool)
        if len(block):
            blocks.append(block)
            lives.append(live)
    while len(blocks) > MAX_BLOCKS:
        sizes = [int(live.sum()) for live in lives]
        i = min(range(len(blocks) - 1), key=lambda j: sizes[j] + sizes[j + 1])
        blocks[i : i + 2] = [_live_rows(blocks[i : i + 2], lives[i : i + 2])]
        lives[i : i + 2] = [np.ones(len(blocks[i]), bool)]
    live = np.concatenate(lives) if lives else np.zeros(0, bool)
    return IndexState(
        state.version,
        tuple(blocks),
        live,
        int(live.size - live.sum()),
        state.file_ids,
        state.masked_files,
    )


def _dead_share(state: IndexState, lo: int, rows: int) -> float:
    if not rows:
        return 1.0
    return 1.0 - int(state.live[lo : lo + rows].sum()) / rows


def _live_rows(blocks: list[Block], lives: list[np.ndarray]) -> Block:
    """The live rows of ``blocks`` (``lives[i]``: which of block i's are), as one block."""
    import pyarrow as pa

    dim = blocks[0].matrix.shape[1]
    # Filled in place: masking each block and then concatenating the parts
    # would hold the live vectors twice at once.
    matrix = np.empty((sum(int(live.sum()) for live in lives), dim), np.float32)
    hashed = all(block.texts is not None for block in blocks)
    keys, files, positions, texts = [], [], [], []
    filled = 0
    for block, live in zip(blocks, lives, strict=True):
        kept = int(live.sum())
        np.compress(live, block.matrix, axis=0, out=matrix[filled : filled + kept])
        filled += kept
        keys.append(block.keys.filter(pa.array(live)))
        files.append(block.files[live])
        positions.append(block.positions[live])
        if block.texts is not None:
            texts.append(block.texts[live])
    return Block(
        matrix=matrix,
        keys=pa.concat_tables(keys).combine_chunks(),
        files=np.concatenate(files),
        positions=np.concatenate(positions),
        texts=np.concatenate(texts) if hashed and texts else None,
    )
