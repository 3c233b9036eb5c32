"""The bucket set: small, and every step maps onto the smallest bucket that holds it."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from jaxllm.buckets import Bucket, BucketSet


@pytest.mark.parametrize("single", [False, True])
def test_bucket_set_is_small_and_picks_the_smallest_fit(single):
    b = BucketSet(512, 64, 4096, 16, single_token_bucket=single)
    assert b.token_buckets == (1,) * single + (8, 16, 32, 64, 128, 256, 512)
    assert b.page_widths == (16, 64, 256)
    assert len(b.all()) == len(b) <= 24 + 3 * single and len(set(b.all())) == len(b)
    assert f"{21 + 3 * single} step buckets" in b.describe()
    if single:
        assert b.pick(1, 1, 5) == Bucket(1, 1, 16) and b.pick(2, 1, 5) == Bucket(8, 8, 16)
    rng = np.random.default_rng(secrets.randbits(32))
    for _ in range(200):
        t = int(rng.integers(1, 513))
        n = int(rng.integers(1, min(t, 64) + 1))
        p = int(rng.integers(1, 257))
        got = b.pick(t, n, p)
        assert got in b.all()
        fits = [x for x in b.all() if x.num_tokens >= t and x.num_seqs >= n and x.pages_per_seq >= p]
        assert got == min(fits, key=lambda x: (x.num_tokens, x.pages_per_seq))
    odd = BucketSet(100, 3, 50, 16)
    assert odd.token_buckets[-1] == 100 and odd.page_widths == (4,)
    for bad in ((600, 1, 1), (8, 1, 300), (0, 1, 1)):
        with pytest.raises(ValueError):
            b.pick(*bad)
