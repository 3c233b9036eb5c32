"""Paged KV cache: host-side page bookkeeping (allocator, prefix cache) and device arrays."""

from jaxllm.cache.allocator import NULL_PAGE, OutOfPagesError, PageAllocator
from jaxllm.cache.invariants import check_invariants
from jaxllm.cache.manager import KVCacheManager
from jaxllm.cache.prefix_cache import PrefixCacheStats, extend_page_hashes, hash_page

__all__ = [
    "NULL_PAGE",
    "KVCacheManager",
    "OutOfPagesError",
    "PageAllocator",
    "PrefixCacheStats",
    "check_invariants",
    "extend_page_hashes",
    "hash_page",
]
