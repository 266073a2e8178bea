"""Block bookkeeping for the paged KV cache: a pool of fixed-size blocks and per-request block tables.

No tensors here: the pool hands out block ids, the runner owns the memory they index.

Prefix caching: every full block of a sequence gets a hash chained from the previous block's hash,
its token ids and the adapter identity, so equal hashes mean equal KV. Blocks whose owners are gone
stay in the hash map while on the free list and are reused on a hit; the free list is kept in
eviction order (least recently freed first, and the tail of a sequence before its head), so the
blocks most likely to be shared are evicted last.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Hashable, Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], adapter: tuple[Hashable, ...] | None) -> BlockHash:
    """sha256 over (parent hash, adapter identity, token ids); never Python's salted `hash()`."""
    h = hashlib.sha256()
    h.update(parent or b"\x00" * 32)
    h.update(repr(adapter).encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, adapter: tuple[Hashable, ...] | None,
                 start: list[BlockHash] | None = None) -> list[BlockHash]:
    """Chained hashes of every full block of token_ids, extending the already known `start`."""
    hashes = list(start or [])
    for b in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[b * block_size:(b + 1) * block_size], adapter))
    return hashes


class BlockPool:
    """Fixed-size blocks with reference counts, an LRU free list and a hash -> block map."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        # Insertion order is eviction order: the first key is evicted first.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or cached with no owner)."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash) if self.enable_prefix_caching else None

    def take(self, n: int) -> list[int]:
        """Hand out n unowned blocks, evicting the least recently freed cached ones."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:  # evict: its content is about to be overwritten
                del self.cached[old]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Add an owner to blocks already holding wanted content (prefix hits, forks)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop an owner; blocks nobody owns go to the end of the free list (evicted last).

        Callers pass a sequence's blocks tail first, so a chain's head outlives its tail.
        """
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Make a full, computed block findable by its hash (first writer wins on duplicates)."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None or block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def num_evictable(self, blocks: Sequence[int]) -> int:
        """How many of these (hit) blocks are on the free list, so sharing them uses up free blocks."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)


class KVCacheManager:
    """Per-request block tables over a BlockPool, with check-then-act allocation.

    A request's table covers its computed tokens plus the tokens scheduled this step. Full blocks
    are registered in the prefix cache once their KV has been computed (`cache_blocks`).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[BlockHash]] = {}
        self.num_registered: dict[str, int] = {}  # blocks of the table already offered to the cache

    @property
    def enable_prefix_caching(self) -> bool:
        return self.pool.enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    # -- prefix cache ---------------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: Sequence[int], adapter: tuple[Hashable, ...] | None) -> list[int]:
        """Blocks already holding the longest cached prefix of token_ids.

        The last token is never served from the cache: its logits are needed, so at least one
        token is always computed.
        """
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        hits: list[int] = []
        parent = None
        for b in range(usable):
            parent = hash_block(parent, token_ids[b * self.block_size:(b + 1) * self.block_size], adapter)
            block = self.pool.lookup(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- allocation -----------------------------------------------------------------------------
    def num_blocks_needed(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> int:
        """Free blocks an `allocate(request_id, num_tokens, cached)` call would consume."""
        have = len(self.tables.get(request_id, ())) + len(cached)
        grow = max(0, self.blocks_for(num_tokens) - have)
        return grow + self.pool.num_evictable(cached) if cached else grow  # runs per request per step

    def can_allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether the table can grow to cover num_tokens tokens (cached prefix blocks first)."""
        return self.num_blocks_needed(request_id, num_tokens, cached) <= self.pool.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Grow the table to cover num_tokens tokens; returns the whole table. Check can_allocate first."""
        table = self.tables.get(request_id)
        if table is not None and not cached and len(table) * self.block_size >= num_tokens:
            return table  # nothing to add: most decode steps
        if not self.can_allocate(request_id, num_tokens, cached):
            raise RuntimeError(f"not enough free KV blocks for {request_id!r} ({num_tokens} tokens)")
        table = self.tables.setdefault(request_id, [])
        if cached:
            if table:
                raise RuntimeError(f"{request_id!r} already has blocks; cached prefixes attach to empty tables")
            self.pool.share(cached)
            table.extend(cached)
            self.num_registered[request_id] = len(cached)
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.pool.take(missing))
        return table

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[int]:
        """Give child_id shared ownership of the parent's blocks fully covered by num_tokens tokens."""
        if child_id in self.tables:
            raise RuntimeError(f"{child_id!r} already has blocks")
        shared = self.tables[parent_id][:num_tokens // self.block_size]
        self.pool.share(shared)
        self.tables[child_id] = list(shared)
        self.num_registered[child_id] = min(self.num_registered.get(parent_id, 0), len(shared))
        if parent_id in self.hashes:
            self.hashes[child_id] = self.hashes[parent_id][:len(shared)]
        return self.tables[child_id]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                     adapter: tuple[Hashable, ...] | None) -> None:
        """Register the request's blocks that became full and computed, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        table = self.tables.get(request_id)
        if not table:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        done = self.num_registered.get(request_id, 0)
        if num_full <= done:
            return
        hashes = block_hashes(token_ids[:num_full * self.block_size], self.block_size, adapter,
                              self.hashes.get(request_id))
        self.hashes[request_id] = hashes
        for b in range(done, num_full):
            self.pool.register(table[b], hashes[b])
        self.num_registered[request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release every block of the request (tail first, so its head stays cached longest)."""
        table = self.tables.pop(request_id, None)
        self.hashes.pop(request_id, None)
        self.num_registered.pop(request_id, None)
        if table:
            self.pool.release(list(reversed(table)))
