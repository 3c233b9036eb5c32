"""Host-side bookkeeping of KV-cache pages: owners, reference counts, free list, cached pages.

Every page is in exactly one state:
- the null page (page 0 when reserved): padded page-table entries point at it, never owned;
- free: no owner, no cached content;
- cached-free: no owner, holds a full page registered under its prefix hash, reusable by a
  later request with the same prefix, evicted least-recently-released first when needed;
- used: one or more owners (request ids); refcount == number of owners.
A page shared by several owners is always full and read-only; only its first owner wrote it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """No free or evictable page is left."""


class PageAllocator:
    """Pages with explicit owners and refcounts, plus the prefix-hash -> page table."""

    def __init__(self, num_pages: int, page_size: int, *, reserve_null_page: bool = True) -> None:
        if page_size < 2:
            raise ValueError(f"page_size must be >= 2, got {page_size}")
        first = 1 if reserve_null_page else 0
        if num_pages - first < 1:
            raise ValueError(f"num_pages={num_pages} leaves no usable page (null page reserved: "
                             f"{reserve_null_page})")
        self.num_pages = num_pages
        self.page_size = page_size
        self.null_page: int | None = NULL_PAGE if reserve_null_page else None
        self._free: deque[int] = deque(range(first, num_pages))
        self._refcount = [0] * num_pages
        self._owners: list[set[str]] = [set() for _ in range(num_pages)]
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._hash_to_page: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached-free pages, LRU first
        self.num_evictions = 0

    # ---- counts -------------------------------------------------------------------------
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - (0 if self.null_page is None else 1)

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: free plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_pages(self) -> int:
        return len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of usable pages owned by live requests (cached-free pages count as free)."""
        return self.num_used_pages / self.num_usable_pages

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def owners(self, page: int) -> frozenset[str]:
        return frozenset(self._owners[page])

    def page_hash(self, page: int) -> bytes | None:
        return self._page_hash[page]

    # ---- ownership ----------------------------------------------------------------------
    def allocate(self, owner: str) -> int:
        """A fresh page for `owner` to write; evicts the least recently used cached page if
        no never-cached page is free."""
        if self._free:
            page = self._free.popleft()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._forget_hash(page)
            self.num_evictions += 1
        else:
            raise OutOfPagesError("no free KV-cache page")
        self._add_owner(page, owner)
        return page

    def allocate_many(self, owner: str, count: int) -> list[int]:
        """`count` pages or none at all (raises OutOfPagesError, nothing taken)."""
        if count > self.num_free_pages:
            raise OutOfPagesError(f"need {count} pages, {self.num_free_pages} free")
        return [self.allocate(owner) for _ in range(count)]

    def retain(self, page: int, owner: str) -> None:
        """Add a read-only owner to a full page (prefix hit or a sibling sample's fork)."""
        if self._refcount[page] == 0:
            if page not in self._evictable:
                raise ValueError(f"page {page} is free and holds nothing to share")
            del self._evictable[page]
        self._add_owner(page, owner)

    def release(self, page: int, owner: str) -> None:
        """Drop one owner; an unowned page becomes cached-free if registered, else free."""
        if owner not in self._owners[page]:
            raise ValueError(f"{owner!r} does not own page {page}")
        self._owners[page].discard(owner)
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            if self._page_hash[page] is not None:
                self._evictable[page] = None  # most recently used at the end
            else:
                self._free.append(page)

    def _add_owner(self, page: int, owner: str) -> None:
        if page == self.null_page:
            raise ValueError("the null page cannot be owned")
        if owner in self._owners[page]:
            raise ValueError(f"{owner!r} already owns page {page}")
        self._owners[page].add(owner)
        self._refcount[page] += 1

    # ---- prefix cache -------------------------------------------------------------------
    def register(self, page: int, page_hash: bytes) -> bool:
        """Record that a used, full page holds the prefix `page_hash`. False if another page
        already holds that prefix (this one then stays private and is freed normally)."""
        if self._refcount[page] == 0:
            raise ValueError(f"page {page} is not in use")
        current = self._page_hash[page]
        if current is not None:
            return current == page_hash
        if page_hash in self._hash_to_page:
            return False
        self._page_hash[page] = page_hash
        self._hash_to_page[page_hash] = page
        return True

    def lookup(self, page_hash: bytes) -> int | None:
        return self._hash_to_page.get(page_hash)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix: cached-free pages become free, used pages stay owned
        but will not be reused by hash. Returns how many prefixes were dropped."""
        dropped = len(self._hash_to_page)
        for page in list(self._hash_to_page.values()):
            self._page_hash[page] = None
        self._hash_to_page.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()
        return dropped

    def _forget_hash(self, page: int) -> None:
        h = self._page_hash[page]
        if h is not None:
            del self._hash_to_page[h]
            self._page_hash[page] = None

    # ---- checking -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the page states are inconsistent (see module docstring)."""
        free = list(self._free)
        evictable = list(self._evictable)
        assert len(set(free)) == len(free), "a page is on the free list twice"
        assert not set(free) & set(evictable), "a page is both free and cached-free"
        used = [p for p in range(self.num_pages) if self._refcount[p] > 0]
        null = [] if self.null_page is None else [self.null_page]
        assert len(free) + len(evictable) + len(used) + len(null) == self.num_pages, (
            f"pages lost: free {len(free)} + cached {len(evictable)} + used {len(used)} + "
            f"null {len(null)} != {self.num_pages}")
        for p in range(self.num_pages):
            assert self._refcount[p] == len(self._owners[p]), (
                f"page {p}: refcount {self._refcount[p]} != {len(self._owners[p])} owners")
            assert self._refcount[p] >= 0
        for p in free:
            assert self._refcount[p] == 0 and self._page_hash[p] is None, f"free page {p} dirty"
        for p in evictable:
            assert self._refcount[p] == 0 and self._page_hash[p] is not None, (
                f"cached-free page {p} without a hash or with owners")
        for h, p in self._hash_to_page.items():
            assert self._page_hash[p] == h, f"hash table and page {p} disagree"
        assert sum(h is not None for h in self._page_hash) == len(self._hash_to_page)
        if self.null_page is not None:
            p = self.null_page
            assert self._refcount[p] == 0 and p not in free and p not in self._evictable
