"""Chained hashes of full pages, the key of the prefix cache, and its hit counters.

A page's hash covers its parent's hash and its own token ids, so equal hashes mean equal whole
prefixes. The first page also covers the request's optional cache_salt: requests that do not
share a salt never share a page (no cross-tenant timing channel through the cache).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

_ROOT = b"jaxllm-prefix-v1"


def hash_page(parent: bytes | None, token_ids: Sequence[int], cache_salt: str | None = None) -> bytes:
    """Hash of one full page given its parent's hash (None for the first page)."""
    h = hashlib.sha256()
    if parent is None:
        h.update(_ROOT)
        if cache_salt is not None:
            salt = cache_salt.encode()
            h.update(len(salt).to_bytes(8, "little"))
            h.update(salt)
        else:
            h.update(b"\xff" * 8)  # distinct from every salt, even the empty string
    else:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())  # int64 ids (~2x cheaper than numpy for a page)
    return h.digest()


def extend_page_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    page_size: int,
    num_pages: int,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Grow `hashes` (in place) to cover the first num_pages full pages of token_ids."""
    num_pages = min(num_pages, len(token_ids) // page_size)
    while len(hashes) < num_pages:
        i = len(hashes)
        parent = hashes[-1] if hashes else None
        hashes.append(hash_page(parent, token_ids[i * page_size:(i + 1) * page_size], cache_salt))
    return hashes


@dataclass
class PrefixCacheStats:
    """Token counts over all prefix lookups since start (or the last reset of the counters)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    num_queries: int = 0

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit
        self.num_queries += 1

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
