"""Page allocator, prefix hashes, invariant checker and the device KV-cache arrays."""

from __future__ import annotations

import hashlib
import secrets

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.cache import (
    KVCacheManager,
    OutOfPagesError,
    PageAllocator,
    check_invariants,
    extend_page_hashes,
    hash_page,
)
from jaxllm.cache.kv_cache import (
    allocate_kv_caches,
    bytes_per_page,
    kv_cache_shape,
    pages_for_budget,
)
from jaxllm.config import ModelConfig
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams


def test_allocate_share_release_and_refcounts():
    a = PageAllocator(6, 4)
    assert a.num_usable_pages == 5 and a.num_free_pages == 5
    p, q = a.allocate("r1"), a.allocate("r1")
    assert 0 not in (p, q)  # the null page is never handed out
    assert a.register(p, b"h0")
    a.retain(p, "r2")
    assert a.refcount(p) == 2 and a.owners(p) == {"r1", "r2"}
    with pytest.raises(ValueError, match="already owns"):
        a.retain(p, "r2")
    with pytest.raises(ValueError, match="does not own"):
        a.release(q, "r2")
    a.release(p, "r1")
    a.release(p, "r2")
    assert a.num_cached_free_pages == 1 and a.lookup(b"h0") == p  # full page stays cached
    a.release(q, "r1")
    assert a.num_used_pages == 0 and a.lookup(b"h0") == p
    a.check_invariants()
    with pytest.raises(ValueError, match="holds nothing"):
        a.retain(q, "r3")  # free, never cached
    with pytest.raises(OutOfPagesError):
        a.allocate_many("r3", 6)
    assert a.num_used_pages == 0  # all or nothing


def test_duplicate_prefix_stays_private():
    a = PageAllocator(4, 2)
    p, q = a.allocate("x"), a.allocate("y")
    assert a.register(p, b"same") and not a.register(q, b"same")
    a.release(q, "y")
    a.release(p, "x")
    assert a.num_cached_free_pages == 1 and a.page_hash(q) is None
    a.check_invariants()


def test_lru_eviction_order_and_reset():
    a = PageAllocator(5, 2)
    pages = [a.allocate(f"r{i}") for i in range(4)]
    for i, p in enumerate(pages):
        a.register(p, bytes([i]))
    for i in (2, 0, 3, 1):  # release order = recency order
        a.release(pages[i], f"r{i}")
    a.retain(pages[0], "again")  # a hit takes it off the LRU list
    a.release(pages[0], "again")  # ... and puts it back as most recent
    taken = [a.allocate("new") for _ in range(2)]
    assert taken == [pages[2], pages[3]] and a.num_evictions == 2
    assert a.lookup(bytes([2])) is None and a.lookup(bytes([1])) == pages[1]
    a.check_invariants()
    assert a.reset_prefix_cache() == 2
    assert a.num_cached_free_pages == 0 and a.lookup(bytes([0])) is None
    a.check_invariants()


def test_page_hashes_chain_and_salt():
    rng = np.random.default_rng(secrets.randbits(32))
    toks = rng.integers(0, 1000, size=23).tolist()
    hs = extend_page_hashes([], toks, 4, 100)
    assert len(hs) == 5 and len(set(hs)) == 5
    assert hs[1] == hash_page(hs[0], toks[4:8])
    # a page's hash: sha256 of its parent's hash and its ids as int64 (ids from numpy alike)
    assert hs[1] == hashlib.sha256(hs[0] + np.asarray(toks[4:8], np.int64).tobytes()).digest()
    assert hash_page(hs[0], np.asarray(toks[4:8], np.int32)) == hs[1]
    other = toks[:3] + [toks[3] + 1] + toks[4:]  # a change in page 0 changes every later hash
    assert not set(extend_page_hashes([], other, 4, 100)) & set(hs)
    assert extend_page_hashes([], toks, 4, 100, "a") != hs
    assert extend_page_hashes([], toks, 4, 100, "a") != extend_page_hashes([], toks, 4, 100, "b")
    assert extend_page_hashes([], toks, 4, 100, "") != hs  # empty salt is still a salt
    grown = extend_page_hashes(hs[:2], toks, 4, 3)
    assert grown == hs[:3]


def _req(rid: str, toks: list[int]) -> Request:
    return Request(rid, toks, SamplingParams(max_tokens=4))


def test_invariant_checker_catches_corruption():
    a = PageAllocator(8, 4)
    m = KVCacheManager(a)
    r = _req("r", list(range(9)))
    assert m.allocate_slots(r, 9)
    r.num_computed_tokens = 9
    check_invariants(a, [r])
    with pytest.raises(AssertionError, match="owners"):
        check_invariants(a, [])  # pages owned by no live request: a leak
    other = _req("o", list(range(9)))
    a.retain(r.page_ids[2], "o")  # the partial last page shared: two writers
    other.page_ids.append(r.page_ids[2])
    with pytest.raises(AssertionError, match="still written"):
        check_invariants(a, [r, other])
    a.release(r.page_ids[2], "o")
    a._refcount[r.page_ids[0]] += 1  # bookkeeping drift
    with pytest.raises(AssertionError, match="refcount"):
        a.check_invariants()
    a._refcount[r.page_ids[0]] -= 1
    m.free(r)
    check_invariants(a, [], expect_no_used_pages=True)


def test_allocate_slots_counts_reclaimed_cached_pages():
    a = PageAllocator(5, 2)  # 4 usable pages
    m = KVCacheManager(a)
    first = _req("a", [1, 2, 3, 4, 5])
    assert m.allocate_slots(first, 5)
    first.num_computed_tokens = 5
    m.register_computed(first, 5)
    m.free(first)
    second = _req("b", [1, 2, 3, 4, 9, 9, 9])
    cached = m.find_cached_prefix(second)
    assert len(cached) == 2
    assert m.allocate_slots(second, 3, cached)  # 2 cached + 2 fresh = all 4 pages
    assert second.num_computed_tokens == 4 and len(second.page_ids) == 4
    third = _req("c", [7, 7, 7])
    assert not m.allocate_slots(third, 3) and not third.page_ids
    check_invariants(a, [second, third])


def _tiny_model(**kw) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16,
                intermediate_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_cache_arrays_and_budget(dtype):
    cfg = _tiny_model()
    per_page = bytes_per_page(cfg, 4, dtype)
    caches = allocate_kv_caches(cfg, 5, 4, dtype)
    assert len(caches) == cfg.num_layers
    assert all(c.shape == kv_cache_shape(cfg, 5, 4) == (5, 4, 4, 8) for c in caches)
    assert all(c.dtype == dtype and not c.any() for c in caches)
    assert sum(c.nbytes for c in caches) == 5 * per_page
    assert pages_for_budget(cfg, 4, dtype, 7 * per_page + per_page - 1) == 7
    with pytest.raises(ValueError, match="at least 2"):
        pages_for_budget(cfg, 4, dtype, per_page)
    with pytest.raises(ValueError):
        allocate_kv_caches(cfg, 1, 4, dtype)
