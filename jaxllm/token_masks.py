"""Per-row allowed-token bitmasks: which tokens a row may sample this step.

One mechanism serves every hard constraint on the next token (min_tokens hiding EOS and stop
ids, allowed_token_ids, bad_words, and later a grammar's bitmask): a packed int32 array
[rows, ceil(V / 32)], bit `t % 32` of word `t // 32` set when token t is allowed (the layout
grammar libraries such as xgrammar fill). A row of all ones (-1 words) is unconstrained; when
every row is, the sampler skips the unpacking entirely.

Host side: `row_constraints` turns one request's settings and output so far into an allowed set
or banned ids; `pack_allowed` packs a bool row. Device side: `unpack_allowed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxllm.sampling_params import SamplingParams

WORD_BITS = 32
ALL_ALLOWED = -1  # an int32 word with every bit set


def num_mask_words(vocab_size: int) -> int:
    return -(-vocab_size // WORD_BITS)


def all_allowed(rows: int, vocab_size: int) -> np.ndarray:
    """The unconstrained mask: int32 [rows, words] of -1."""
    return np.full((rows, num_mask_words(vocab_size)), ALL_ALLOWED, np.int32)


def pack_allowed(allowed: np.ndarray) -> np.ndarray:
    """bool [..., V] -> int32 [..., ceil(V / 32)] (tokens past V are marked allowed)."""
    vocab = allowed.shape[-1]
    words = num_mask_words(vocab)
    padded = np.ones(allowed.shape[:-1] + (words * WORD_BITS,), bool)
    padded[..., :vocab] = allowed
    bits = padded.reshape(allowed.shape[:-1] + (words, WORD_BITS)).astype(np.uint64)
    packed = np.sum(bits << np.arange(WORD_BITS, dtype=np.uint64), axis=-1)
    return packed.astype(np.uint32).view(np.int32)


def unpack_allowed(words: jax.Array, vocab_size: int) -> jax.Array:
    """int32 [R, W] -> bool [R, vocab_size] (on device)."""
    u = lax.bitcast_convert_type(words, jnp.uint32)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits = lax.shift_right_logical(u[:, :, None], shifts[None, None, :]) & jnp.uint32(1)
    return bits.reshape(words.shape[0], -1)[:, :vocab_size] != 0


def unpack_allowed_host(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """numpy twin of `unpack_allowed` (for oracles and tests)."""
    u = np.asarray(words, np.int32).view(np.uint32)
    bits = (u[..., None] >> np.arange(WORD_BITS, dtype=np.uint32)) & 1
    return bits.reshape(u.shape[:-1] + (-1,))[..., :vocab_size] != 0


def row_constraints(params: SamplingParams, output_index: int, output_ids: Sequence[int],
                    eos_token_ids: Iterable[int]) -> tuple[list[int] | None, set[int]]:
    """(allowed ids or None = all, banned ids) for the token at `output_index`.

    min_tokens: EOS (unless ignore_eos) and stop_token_ids are banned before it is reached.
    bad_words: a one-token word is always banned; a longer word bans its last token when the
    output ends with the rest of it. `output_ids` must be the output up to `output_index`
    (a row sampling ahead of its known output skips the multi-token check).
    """
    banned: set[int] = set()
    if output_index < params.min_tokens:
        if not params.ignore_eos:
            banned.update(int(t) for t in eos_token_ids)
        banned.update(params.stop_token_ids or [])
    known_tail = len(output_ids) == output_index
    for word in params.bad_words_token_ids or []:
        head = word[:-1]
        if not head:
            banned.add(word[-1])
        elif known_tail and len(output_ids) >= len(head) and list(output_ids[-len(head):]) == head:
            banned.add(word[-1])
    return params.allowed_token_ids, banned


def constraint_row(vocab_size: int, allowed: Sequence[int] | None,
                   banned: Iterable[int]) -> np.ndarray:
    """Packed int32 [words] for one row; ids outside the vocabulary are ignored."""
    if allowed is None:
        row = np.ones(vocab_size, bool)
    else:
        row = np.zeros(vocab_size, bool)
        ids = np.asarray([i for i in allowed if 0 <= i < vocab_size], np.int64)
        row[ids] = True
    ban = np.asarray([i for i in banned if 0 <= i < vocab_size], np.int64)
    row[ban] = False
    return pack_allowed(row)


def bias_row(vocab_size: int, logit_bias: dict[int, float]) -> np.ndarray:
    """Dense float32 [V] additive bias; ids outside the vocabulary are ignored."""
    row = np.zeros(vocab_size, np.float32)
    for token, bias in logit_bias.items():
        if 0 <= token < vocab_size:
            row[token] = bias
    return row


def constraint_arrays(params: Sequence[SamplingParams | None],
                      rows_state: Sequence[tuple[int, Sequence[int], Sequence[int]]],
                      rows: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Host logit bias f32 [rows, V] and allowed mask i32 [rows, words] of a step.

    rows_state[i] = (output index of the token row i samples, its output so far, its EOS ids).
    """
    bias = np.zeros((rows, vocab_size), np.float32)
    allowed = all_allowed(rows, vocab_size)
    for i, p in enumerate(params):
        if p is None:
            continue
        if p.logit_bias:
            bias[i] = bias_row(vocab_size, p.logit_bias)
        if p.has_token_constraints:
            allow, ban = row_constraints(p, *rows_state[i])
            if allow is not None or ban:
                allowed[i] = constraint_row(vocab_size, allow, ban)
    return bias, allowed
