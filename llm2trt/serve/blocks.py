"""The paged KV cache: a pool of fixed-size blocks and one block table per sequence.

Every cache tensor of the graph (a layer's keys or values) keeps its entries in one array of
`(tensors, blocks, kv_heads, block_size, head_dim)`: a sequence's position p lives in block
`table[p // block_size]` at offset `p % block_size`. Memory is fixed when the pool is made, so the
server knows what it can hold: a request reserves the blocks its prompt and `max_tokens` can reach
when it is admitted (it never runs out mid-generation, nothing is preempted) and takes them from the
free list as its sequence grows; finishing or cancelling returns them at once.

The graph itself reads a contiguous past (the exporter's growing form): `gather` lays the rows'
blocks out left-padded for one step and `scatter` writes the step's new entries back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural


@dataclass
class BlockTable:
    """One sequence's blocks, in position order, and how many positions they hold."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    reserved: int = 0  # blocks promised to it at admission (what `blocks` may grow to)


class BlockPool:
    """Fixed-size KV blocks for every cache tensor, a free list and the reservations against it."""

    def __init__(
        self, tensors: int, kv_heads: int, head_dim: int, block_size: int, blocks: int, dtype: np.dtype
    ) -> None:
        if block_size < 1 or blocks < 1:
            raise InputError("the KV cache needs at least one block of at least one slot")
        self.block_size, self.total = block_size, blocks
        self.data = np.zeros((tensors, blocks, kv_heads, block_size, head_dim), dtype=dtype)
        self._free = list(range(blocks - 1, -1, -1))  # popped from the end: low ids first
        self._reserved = 0  # blocks promised to admitted sequences, taken or not

    @staticmethod
    def blocks_for(tensors: int, kv_heads: int, head_dim: int, block_size: int, itemsize: int, budget: int) -> int:
        """How many blocks fit `budget` bytes."""
        per_block = tensors * kv_heads * block_size * head_dim * itemsize
        return budget // per_block

    @property
    def bytes_per_block(self) -> int:
        return int(self.data[:, 0].nbytes)

    @property
    def in_use(self) -> int:
        """Blocks holding entries now."""
        return self.total - len(self._free)

    @property
    def reserved(self) -> int:
        return self._reserved

    def needed(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def can_reserve(self, positions: int) -> bool:
        return self._reserved + self.needed(positions) <= self.total

    def reserve(self, positions: int) -> BlockTable:
        """A table for a sequence of at most `positions`; its blocks are taken as it grows."""
        need = self.needed(positions)
        if self._reserved + need > self.total:
            raise InputError(f"the KV cache has {plural(self.total - self._reserved, 'free block')}, {need} needed")
        self._reserved += need
        return BlockTable(reserved=need)

    def release(self, table: BlockTable) -> None:
        """Give back every block of a finished or cancelled sequence, and its reservation."""
        self._free.extend(reversed(table.blocks))
        self._reserved -= table.reserved
        table.blocks, table.length, table.reserved = [], 0, 0

    def _grow(self, table: BlockTable, length: int) -> None:
        need = self.needed(length)
        if need > table.reserved:
            raise InputError(f"a sequence of {length} positions outgrew its {plural(table.reserved, 'KV block')}")
        while len(table.blocks) < need:
            table.blocks.append(self._free.pop())

    def gather(self, tables: list[BlockTable]) -> np.ndarray:
        """The rows' cached entries left-padded to the longest: `(tensors, rows, kv_heads, longest, head_dim)`.
        Block by block into one buffer (one copy of what is cached; the padding zeroed, since a masked
        slot still meets a zero weight and must not be NaN)."""
        longest = max(t.length for t in tables)
        tensors, _, heads, size, dim = self.data.shape
        out = np.empty((tensors, len(tables), heads, longest, dim), dtype=self.data.dtype)
        for row, table in enumerate(tables):
            pad = longest - table.length
            out[:, row, :, :pad] = 0
            for index in range(self.needed(table.length)):
                start = index * size
                take = min(size, table.length - start)
                out[:, row, :, pad + start : pad + start + take] = self.data[:, table.blocks[index], :, :take]
        return out

    def scatter(self, table: BlockTable, entries: np.ndarray) -> None:
        """Append `entries` `(tensors, kv_heads, n, head_dim)` after the sequence's cached ones."""
        count = entries.shape[2]
        start = table.length
        self._grow(table, start + count)
        size = self.block_size
        position = start
        while position < start + count:
            block, offset = table.blocks[position // size], position % size
            take = min(size - offset, start + count - position)
            self.data[:, block, :, offset : offset + take] = entries[:, :, position - start : position - start + take]
            position += take
        table.length = start + count
