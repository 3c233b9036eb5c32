"""Random ragged paged-attention batches and a float64 numpy dense-attention oracle.

A case is a list of (kv_len, q_len) per real sequence. Pages are handed out in a shuffled
order, everything not holding a real cached token is poisoned with NaN, and the columns of
page_indices past a sequence's used pages point at poisoned pages or at other sequences' pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


@dataclass
class RaggedCase:
    q: np.ndarray
    k_new: np.ndarray
    v_new: np.ndarray
    kv_cache: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray
    seqs: list[tuple[int, int]]
    sm_scale: float

    def args(self, dtype) -> tuple:
        """Device arrays in the call order of ragged_paged_attention."""
        return (
            jnp.asarray(self.q, dtype),
            jnp.asarray(self.k_new, dtype),
            jnp.asarray(self.v_new, dtype),
            jnp.asarray(self.kv_cache, dtype),
            jnp.asarray(self.kv_lens),
            jnp.asarray(self.page_indices),
            jnp.asarray(self.cu_q_lens),
            jnp.asarray(self.num_seqs),
        )


def make_case(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
    extra_page_cols: int = 1,
    spare_pages: int = 3,
) -> RaggedCase:
    pages_needed = [-(-kv // page_size) for kv, _ in seqs]
    num_pages = sum(pages_needed) + spare_pages
    perm = rng.permutation(num_pages)
    width = max(pages_needed) + extra_page_cols
    max_seqs = len(seqs) + pad_seqs
    page_indices = rng.integers(0, num_pages, size=(max_seqs, width)).astype(np.int32)
    cache = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float32)
    cursor = 0
    for s, ((kv_len, q_len), n) in enumerate(zip(seqs, pages_needed, strict=True)):
        page_indices[s, :n] = perm[cursor : cursor + n]
        cursor += n
        for pos in range(kv_len - q_len):  # cached prefix holds real data
            page = page_indices[s, pos // page_size]
            cache[page, pos % page_size] = rng.standard_normal((2 * num_kv_heads, head_dim))
    q_lens = [q for _, q in seqs]
    num_tokens = sum(q_lens) + pad_tokens
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : len(seqs) + 1] = np.cumsum(q_lens)
    cu[len(seqs) + 1 :] = cu[len(seqs)]
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[: len(seqs)] = [kv for kv, _ in seqs]
    kv_lens[len(seqs) :] = rng.integers(1, 5, size=pad_seqs)  # padding seqs: junk lengths
    return RaggedCase(
        q=rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32),
        k_new=rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32),
        v_new=rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32),
        kv_cache=cache,
        kv_lens=kv_lens,
        page_indices=page_indices,
        cu_q_lens=cu,
        num_seqs=np.array([len(seqs)], np.int32),
        seqs=list(seqs),
        sm_scale=float(head_dim) ** -0.5,
    )


def _as64(x, dtype) -> np.ndarray:
    """Round through the test dtype (as the implementation sees it), then widen to float64."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def oracle(case: RaggedCase, dtype, *, sliding_window=None, soft_cap=None):
    """Expected (out, cache) by dense float64 attention per sequence."""
    q, k_new, v_new = (_as64(x, dtype) for x in (case.q, case.k_new, case.v_new))
    cache = _as64(case.kv_cache, dtype)
    page_size = cache.shape[1]
    hkv = k_new.shape[1]
    group = q.shape[1] // hkv
    out = np.zeros_like(q)
    for s, (kv_len, q_len) in enumerate(case.seqs):
        start = case.cu_q_lens[s]
        first = kv_len - q_len
        for j in range(q_len):
            pos = first + j
            page = case.page_indices[s, pos // page_size]
            cache[page, pos % page_size, 0::2] = k_new[start + j]
            cache[page, pos % page_size, 1::2] = v_new[start + j]
        pages = case.page_indices[s, : -(-kv_len // page_size)]
        kv = cache[pages].reshape(-1, 2 * hkv, q.shape[2])[:kv_len]
        keys, values = kv[:, 0::2], kv[:, 1::2]
        for j in range(q_len):
            pos = first + j
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(q.shape[1]):
                logits = keys[lo : pos + 1, h // group] @ q[start + j, h] * case.sm_scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                p = np.exp(logits - logits.max())
                out[start + j, h] = (p / p.sum()) @ values[lo : pos + 1, h // group]
    return out, cache


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| over the real tokens."""
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    return float(np.max(np.abs(a - expected)) / max(np.max(np.abs(expected)), 1e-30))


def rel_norm_err(actual, expected) -> float:
    """||actual - expected|| / ||expected||: robust to single bf16 rounding flips."""
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    return float(np.linalg.norm(a - expected) / max(np.linalg.norm(expected), 1e-30))


def fresh_rng() -> np.random.Generator:
    """A generator on a new seed each run; the seed is printed, so a failure names it."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def check_against_reference(case: RaggedCase, impl: str, dtype, tol: float, **opts) -> None:
    """`impl` equals the float64 oracle and the reference on `case`: outputs within `tol`,
    finite everywhere, zero for padding tokens, and the very same cache slots written."""
    from jaxllm.kernels import ragged_paged_attention

    args = case.args(dtype)
    ref_out, ref_cache = ragged_paged_attention(*args, sm_scale=case.sm_scale, impl="reference",
                                                **opts)
    out, cache = ragged_paged_attention(*args, sm_scale=case.sm_scale, impl=impl, **opts)
    want_out, _ = oracle(case, dtype, **opts)
    real = int(case.cu_q_lens[int(case.num_seqs.reshape(-1)[0])])
    assert out.dtype == dtype and out.shape == case.q.shape
    assert rel_err(out[:real], want_out[:real]) <= tol
    assert rel_err(out[:real], np.asarray(ref_out[:real].astype(jnp.float32))) <= tol
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)  # padding tokens
    got, want = (np.asarray(c.astype(jnp.float32)) for c in (cache, ref_cache))
    np.testing.assert_array_equal(got, want)  # same slots written, NaN == NaN elsewhere


def args_in_layout(case: RaggedCase, dtype, cache_shape: tuple[int, ...]) -> tuple:
    """case.args(dtype) with the cache widened to `cache_shape` (a backend layout's padded kv
    heads / head_dim) as the engine holds it: padding zero in slots holding tokens, NaN in
    poisoned slots."""
    args = list(case.args(dtype))
    cache = np.asarray(case.kv_cache)
    _, _, heads, dim = cache.shape
    poisoned = np.isnan(cache).any(axis=(2, 3), keepdims=True)
    wide = np.where(poisoned, np.nan, 0.0) * np.ones(cache_shape, np.float32)
    wide[:, :, :heads, :dim] = cache
    args[3] = jnp.asarray(wide, dtype)
    return tuple(args)


def real_part(cache, case: RaggedCase) -> np.ndarray:
    """The [..., :2*Hkv, :D] part of a (possibly padded) cache, as float32."""
    _, _, heads, dim = case.kv_cache.shape
    return np.asarray(cache[:, :, :heads, :dim].astype(jnp.float32))
