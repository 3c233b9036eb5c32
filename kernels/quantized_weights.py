"""Weights kept in GGUF quantization blocks, repacked for the quantized matmul kernel.

A GGUF Q4_0 / Q4_1 / Q8_0 tensor stores each output row in blocks of 32 inputs: a float16
scale d (and, for Q4_1, a float16 offset m) plus 32 small integers q. The weight is d * q + m
(Q4_0: d * (q - 8), i.e. m = -8d; Q8_0: d * q). The product d * q of a float16 and a 4- or
8-bit integer is exact in float32, so rebuilding a weight this way gives the very float32
value the dequantizing loader stores: keeping the blocks changes no weight, only how many
bytes a matmul reads (0.625 instead of 4 per weight for Q4).

`PackedWeight` regroups the blocks so one vector of 16 lanes holds 16 output columns at the
same input index (layout in kernels/native/quantized_matmul.cc); `dequantize` is the pure-JAX
twin that rebuilds the float32 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # weights per quantization block along the input axis
COLUMNS = 16  # output columns per packed group (one vector)
KINDS = ("q4", "q8")

# GGUF type name -> (bytes per block, kernel kind)
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
PACKABLE_GGUF_TYPES = tuple(_GGUF_BLOCK_BYTES)


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix W [k, n] (y = x @ W) in quantization blocks, repacked.

    codes: q4 uint8 [G, B, 16, 16] (byte = q[32b+j] | q[32b+j+16] << 4 of column 16g+l),
    q8 int8 [G, B, 32, 16]; scales, mins: float16 [G, B, 16] (mins None for q8), with
    G = ceil(n / 16) (padding columns are zero) and B = k / 32. `as_table` marks an embedding
    table [n, k] (rows are W's columns): `shape` is then the table's shape, as the model
    names it, and `check_params` sees the shape it expects either way.
    """

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    k: int
    n: int
    as_table: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"packed weight kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "q4") != (self.mins is not None):
            raise ValueError("q4 packed weights need mins; q8 ones have none")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.as_table else (self.k, self.n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.mins) if a is not None)


def pack_gguf_rows(gguf_type: str, raw: np.ndarray, k: int, *, as_table: bool = False) -> PackedWeight:
    """Pack a GGUF tensor given as raw block bytes, one row per output column: [n, k/32 * bytes].

    Rows may have been reordered beforehand (the loader un-permutes q/k rows that way): a
    block never spans two rows.
    """
    if gguf_type not in _GGUF_BLOCK_BYTES:
        raise ValueError(f"GGUF type {gguf_type} cannot be kept in blocks "
                         f"(supported: {', '.join(PACKABLE_GGUF_TYPES)})")
    if k % BLOCK:
        raise ValueError(f"input size {k} is not a multiple of the {BLOCK}-weight block")
    block_bytes, blocks = _GGUF_BLOCK_BYTES[gguf_type], k // BLOCK
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if raw.shape != (n, blocks * block_bytes):
        raise ValueError(f"raw {gguf_type} rows have shape {raw.shape}, expected "
                         f"({n}, {blocks * block_bytes}) for {k} inputs")
    per_block = raw.reshape(n, blocks, block_bytes)
    scales = per_block[..., 0:2].copy().view(np.float16)[..., 0]  # [n, B]
    mins = None
    if gguf_type == "Q4_1":
        mins = per_block[..., 2:4].copy().view(np.float16)[..., 0]
        codes = per_block[..., 4:]  # [n, B, 16]: GGUF's own (j, j + 16) nibble pairs
        kind = "q4"
    elif gguf_type == "Q4_0":
        if np.any(np.abs(scales.astype(np.float32)) > np.finfo(np.float16).max / 8):
            raise ValueError("Q4_0 scale too large to express -8 * d as a float16 offset")
        mins = (scales * np.float16(-8)).astype(np.float16)  # exact: a power-of-two multiple
        codes = per_block[..., 2:]
        kind = "q4"
    else:
        codes = per_block[..., 2:].view(np.int8)  # [n, B, 32]
        kind = "q8"
    return PackedWeight(kind=kind, codes=_group_columns(codes), scales=_group_columns(scales),
                        mins=None if mins is None else _group_columns(mins), k=k, n=n,
                        as_table=as_table)


def fuse_columns(weights: list[PackedWeight]) -> PackedWeight | None:
    """One weight with the given weights' columns side by side (one matmul call instead of
    several), or None when they cannot be: different kinds or inputs, or a column count off
    the 16-column grid (its padding would land between the parts)."""
    first = weights[0]
    if any(w.kind != first.kind or w.k != first.k or w.as_table for w in weights) or any(
            w.n % COLUMNS for w in weights[:-1]):
        return None

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    return PackedWeight(kind=first.kind, codes=cat([w.codes for w in weights]),
                        scales=cat([w.scales for w in weights]),
                        mins=cat([w.mins for w in weights]), k=first.k,
                        n=sum(w.n for w in weights))


def _group_columns(per_row: np.ndarray) -> np.ndarray:
    """[n, B, ...] per output column -> [G, B, ..., 16] with 16 columns in the last axis."""
    n = per_row.shape[0]
    groups = -(-n // COLUMNS)
    padded = np.zeros((groups * COLUMNS, *per_row.shape[1:]), per_row.dtype)
    padded[:n] = per_row
    grouped = padded.reshape(groups, COLUMNS, *per_row.shape[1:])
    return np.ascontiguousarray(np.moveaxis(grouped, 1, -1))


def random_gguf_rows(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """Random GGUF raw rows (gguf type, [n, bytes]) for a [n, k] shape given by `w`'s shape:
    scales drawn near w's scale, codes uniform. Used by tests and benchmarks, not the loader."""
    n, k = w.shape
    blocks = k // BLOCK
    d = (rng.uniform(0.5, 1.5, (n, blocks)) * np.abs(w).mean() / 8).astype(np.float16)
    if kind == "Q8_0":
        q = rng.integers(-128, 128, (n, blocks, BLOCK), dtype=np.int8)
        return kind, np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)],
                                    axis=-1).reshape(n, -1)
    q = rng.integers(0, 16, (n, blocks, BLOCK), dtype=np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    head = [d[..., None].view(np.uint8)]
    if kind == "Q4_1":
        head.append((-rng.uniform(4, 12, (n, blocks)) * d).astype(np.float16)[..., None].view(np.uint8))
    elif kind != "Q4_0":
        raise ValueError(f"unknown kind {kind}")
    return kind, np.concatenate([*head, nibbles], axis=-1).reshape(n, -1)


def codes_as_integers(kind: str, codes: jax.Array) -> jax.Array:
    """[G, B, J, 16] packed codes -> [G, B, 32, 16] integers in input order."""
    if kind == "q8":
        return codes
    return jnp.concatenate([codes & 15, codes >> 4], axis=2)


def dequantize(kind: str, codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
               n: int) -> jax.Array:
    """The float32 matrix W [k, n] (pure JAX; the kernel's reference twin)."""
    q = codes_as_integers(kind, codes).astype(jnp.float32)
    values = q * scales.astype(jnp.float32)[:, :, None, :]
    if mins is not None:
        values = values + mins.astype(jnp.float32)[:, :, None, :]
    groups, blocks = codes.shape[:2]
    return values.transpose(1, 2, 0, 3).reshape(blocks * BLOCK, groups * COLUMNS)[:, :n]


def gather_columns(kind: str, codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
                   ids: jax.Array) -> jax.Array:
    """Float32 columns W[:, ids] as rows [len(ids), k]: an embedding lookup from the blocks."""
    g, lane = ids // COLUMNS, ids % COLUMNS
    q = codes_as_integers(kind, codes[g, :, :, lane]).astype(jnp.float32)  # [T, B, 32]
    values = q * scales[g, :, lane].astype(jnp.float32)[:, :, None]
    if mins is not None:
        values = values + mins[g, :, lane].astype(jnp.float32)[:, :, None]
    return values.reshape(ids.shape[0], -1)
