"""Block pool and KV cache manager: pure Python bookkeeping, no torch."""
import subprocess
import sys

import pytest

from engine.kv_cache import BlockPool, KVCacheManager, block_hashes, hash_block


def test_bookkeeping_modules_do_not_import_torch():
    code = ("import sys, engine.kv_cache, engine.scheduler, engine.request, engine.sampling; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hash_chain_covers_tokens_parent_and_adapter():
    a = hash_block(None, [1, 2, 3, 4], None)
    assert a == hash_block(None, [1, 2, 3, 4], None)
    assert a != hash_block(None, [1, 2, 3, 5], None)
    assert a != hash_block(None, [1, 2, 3, 4], ("sql", 1))
    assert hash_block(None, [1, 2, 3, 4], ("sql", 1)) != hash_block(None, [1, 2, 3, 4], ("sql", 2))
    assert hash_block(a, [5, 6, 7, 8], None) != hash_block(None, [5, 6, 7, 8], None)
    hs = block_hashes(list(range(10)), 4, None)
    assert len(hs) == 2 and hs[1] == hash_block(hs[0], [4, 5, 6, 7], None)


def test_pool_free_list_is_lru_and_counts_refs():
    pool = BlockPool(4)
    a = pool.take(2)
    assert pool.num_free_blocks == 2 and all(pool.ref_counts[b] == 1 for b in a)
    pool.share([a[0]])
    pool.release([a[0]])
    assert pool.num_free_blocks == 2  # still owned once
    pool.release([a[1], a[0]])
    assert pool.num_free_blocks == 4
    # the two fresh blocks come first, then a[1], then a[0] (freed last, evicted last)
    assert pool.take(4) == [2, 3, a[1], a[0]]
    with pytest.raises(RuntimeError):
        pool.take(1)


def test_eviction_drops_hash_and_hit_revives_free_block():
    pool = BlockPool(2)
    (b,) = pool.take(1)
    pool.register(b, b"h" * 32)
    pool.release([b])
    assert pool.lookup(b"h" * 32) == b and pool.num_evictable([b]) == 1
    pool.share([b])  # a hit takes it off the free list
    assert pool.num_free_blocks == 1 and pool.ref_counts[b] == 1
    pool.release([b])
    pool.take(2)  # evicts it
    assert pool.lookup(b"h" * 32) is None


def test_manager_allocates_by_tokens_and_frees_everything():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.can_allocate("a", 9)
    table = kv.allocate("a", 9)
    assert len(table) == 3 and kv.num_free_blocks == 5
    assert kv.allocate("a", 12) == table  # still fits in three blocks
    assert len(kv.allocate("a", 13)) == 4
    assert not kv.can_allocate("b", 17)
    with pytest.raises(RuntimeError):
        kv.allocate("b", 17)
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.block_table("a") == []


def test_prefix_hits_need_computed_full_blocks_and_keep_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))  # 2 full blocks + 2
    kv.allocate("a", len(tokens))
    assert kv.find_cached_prefix(tokens, None) == []  # nothing computed yet
    kv.cache_blocks("a", tokens, 10, None)
    table = kv.block_table("a")
    assert kv.find_cached_prefix(tokens, None) == table[:2]
    assert kv.find_cached_prefix(tokens[:8], None) == table[:1]  # the last token is always computed
    assert kv.find_cached_prefix(tokens, ("lora", 1)) == []
    assert kv.find_cached_prefix([0] + tokens[1:], None) == []
    kv.free("a")
    hits = kv.find_cached_prefix(tokens + [1, 2, 3], None)
    assert hits == table[:2]
    # both hit blocks sit on the free list, so sharing them uses free blocks
    assert kv.num_blocks_needed("b", 13, hits) == 2 + 2
    kv.allocate("b", 13, hits)
    assert kv.block_table("b")[:2] == hits and kv.num_free_blocks == 4


def test_disabled_prefix_cache_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    tokens = list(range(9))
    kv.allocate("a", 9)
    kv.cache_blocks("a", tokens, 9, None)
    assert kv.find_cached_prefix(tokens, None) == []


def test_fork_shares_full_blocks_only():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = kv.allocate("p", 10)
    child = kv.fork("p", "c", 10)
    assert child == parent[:2]
    assert kv.pool.ref_counts[parent[0]] == 2 and kv.pool.ref_counts[parent[2]] == 1
    kv.free("p")
    assert kv.num_free_blocks == 6
    kv.free("c")
    assert kv.num_free_blocks == 8
