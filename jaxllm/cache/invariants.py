"""Cross-checks between the allocator's page states and the requests that own pages.

Tests call `check_invariants` after every scheduler step; a failure names the broken rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from jaxllm.cache.allocator import PageAllocator
from jaxllm.request import Request


def check_invariants(
    allocator: PageAllocator, requests: Iterable[Request], *, expect_no_used_pages: bool = False
) -> None:
    """Raise AssertionError unless pages and live requests agree:

    - free + cached-free + used (+ null) pages == total, refcount == number of owners;
    - each page's owners are exactly the live requests listing it, none listing it twice;
    - a page that a request may still write (not yet fully computed) has that request as its
      only owner: no page has two writers and no shared page is written;
    - finished requests hold no pages; with expect_no_used_pages, no page is owned at all.
    """
    allocator.check_invariants()
    ps = allocator.page_size
    owners: dict[int, set[str]] = defaultdict(set)
    for req in requests:
        rid = req.request_id
        if req.is_finished:
            assert not req.page_ids, f"finished request {rid} still holds pages"
        assert len(set(req.page_ids)) == len(req.page_ids), f"{rid} lists a page twice"
        # A look-ahead step may feed one token whose id is still on the device.
        ahead = max(0, req.num_pending_samples - 1) + req.num_draft_tokens
        assert req.num_computed_tokens <= req.num_tokens + ahead, f"{rid} computed past its tokens"
        assert req.num_computed_tokens <= len(req.page_ids) * ps, (
            f"{rid}: {req.num_computed_tokens} computed tokens but {len(req.page_ids)} pages")
        for i, page in enumerate(req.page_ids):
            assert page != allocator.null_page, f"{rid} owns the null page"
            assert rid not in owners[page], f"{rid} owns page {page} twice"
            owners[page].add(rid)
            if (i + 1) * ps > req.num_computed_tokens:
                assert allocator.refcount(page) == 1, (
                    f"page {page} is still written by {rid} but has "
                    f"{allocator.refcount(page)} owners")
    for page in range(allocator.num_pages):
        assert allocator.owners(page) == owners.get(page, set()), (
            f"page {page}: allocator owners {sorted(allocator.owners(page))} != requests "
            f"{sorted(owners.get(page, set()))}")
    if expect_no_used_pages:
        assert allocator.num_used_pages == 0, f"{allocator.num_used_pages} pages leaked"
