"""Request-level page operations: prefix lookup, growing a sequence's pages, forking n>1
samples, registering full pages in the prefix cache and freeing a finished sequence.

The scheduler calls these; `PageAllocator` below keeps the per-page truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxllm.cache.allocator import PageAllocator
from jaxllm.cache.prefix_cache import PrefixCacheStats, extend_page_hashes
from jaxllm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Pages of each live request, on top of a `PageAllocator`.

    With prefix caching disabled nothing is hashed or shared across requests; only the
    explicit fork of n>1 sibling samples shares pages.
    """

    def __init__(self, allocator: PageAllocator, *, enable_prefix_caching: bool = True) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._num_registered: dict[str, int] = {}

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Pages holding the longest cached prefix of req's tokens, not yet taken.

        At most (num_tokens - 1) // page_size pages, so at least the last token is always
        computed (the step needs its logits) and no partially filled page is ever shared.
        """
        if not self.enable_prefix_caching or req.page_ids:
            return []
        max_pages = (req.num_tokens - 1) // self.page_size
        extend_page_hashes(req.page_hashes, req.all_token_ids, self.page_size, max_pages,
                           req.cache_salt)
        pages: list[int] = []
        for h in req.page_hashes[:max_pages]:
            page = self.allocator.lookup(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def pages_needed(self, req: Request, num_new_tokens: int, num_cached_pages: int = 0) -> int:
        total = req.num_computed_tokens + num_cached_pages * self.page_size + num_new_tokens
        return max(0, cdiv(total, self.page_size) - len(req.page_ids) - num_cached_pages)

    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached_pages: Sequence[int] = ()
    ) -> bool:
        """Take cached_pages (a prefix hit) and enough fresh pages for num_new_tokens more
        tokens, all or nothing. False (nothing changed) when pages are short."""
        need = self.pages_needed(req, num_new_tokens, len(cached_pages))
        reclaimed = (sum(1 for p in cached_pages if self.allocator.refcount(p) == 0)
                     if cached_pages else 0)  # (a decode's new page: none, and no generator)
        if need > self.allocator.num_free_pages - reclaimed:
            return False
        for page in cached_pages:
            self.allocator.retain(page, req.request_id)
            req.page_ids.append(page)
        req.num_computed_tokens += len(cached_pages) * self.page_size
        req.page_ids.extend(self.allocator.allocate_many(req.request_id, need))
        return True

    def fork(self, leader: Request, sibling: Request, num_pages: int) -> None:
        """Let a sibling sample read the leader's first num_pages (full, computed) pages; it
        recomputes the rest of the prompt into pages of its own (no device copy)."""
        if sibling.page_ids or sibling.num_computed_tokens:
            raise ValueError(f"{sibling.request_id} already holds pages")
        if num_pages * self.page_size > leader.num_computed_tokens:
            raise ValueError("fork of pages the leader has not computed yet")
        for page in leader.page_ids[:num_pages]:
            self.allocator.retain(page, sibling.request_id)
            sibling.page_ids.append(page)
        sibling.num_computed_tokens = num_pages * self.page_size
        sibling.num_cached_tokens = num_pages * self.page_size

    def register_computed(self, req: Request, num_tokens: int) -> None:
        """Put req's full pages among its first num_tokens (computed by a finished step)
        into the prefix cache; no-op when prefix caching is disabled."""
        if not self.enable_prefix_caching:
            return
        done = self._num_registered.get(req.request_id, 0)
        if num_tokens // self.page_size <= done:
            return  # no page filled since the last call (most decode steps)
        full = min(num_tokens, req.num_computed_tokens) // self.page_size
        full = min(full, len(req.page_ids))
        if full <= done:
            return
        extend_page_hashes(req.page_hashes, req.all_token_ids, self.page_size, full,
                           req.cache_salt)
        for i in range(done, full):
            self.allocator.register(req.page_ids[i], req.page_hashes[i])
        self._num_registered[req.request_id] = full

    def register_computed_rows(self, rows: Iterable[tuple[Request, int]]) -> None:
        """`register_computed(req, num_tokens)` for each pair (a step's rows), the common
        case (no page filled since the request's last registration: most decode rows)
        decided here without the call."""
        if not self.enable_prefix_caching:
            return
        registered, page_size = self._num_registered, self.page_size
        for req, num_tokens in rows:
            if num_tokens // page_size > registered.get(req.request_id, 0):
                self.register_computed(req, num_tokens)

    def free(self, req: Request) -> None:
        """Release all of req's pages (tail first, so the LRU evicts a chain's end first)."""
        for page in reversed(req.page_ids):
            self.allocator.release(page, req.request_id)
        req.page_ids.clear()
        req.scheduled_pages = []  # (a step's view of those pages: never to be reused now)
        req.num_computed_tokens = 0
        self._num_registered.pop(req.request_id, None)

    def reset_prefix_cache(self) -> int:
        self._num_registered.clear()
        return self.allocator.reset_prefix_cache()
