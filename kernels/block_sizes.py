"""Tuned block sizes, kept apart from kernel logic so retuning never touches a kernel.

Each function takes static shapes and returns static ints. Values were chosen by measurement
where a measurement exists (see benchmarks/attention_bench.py); otherwise they are conservative
defaults that satisfy the layout rules of the backend.
"""

from __future__ import annotations


def reference_token_block(
    num_tokens: int, kv_capacity: int, num_kv_heads: int, head_dim: int
) -> int:
    """Tokens per step of the reference's loop over the flattened token axis.

    A block of tokens that spans several sequences gathers each token's pages separately
    ([block, kv_capacity, 2*Hkv, D] floats), so the block is capped to keep that gather near
    64 MiB; decode batches up to 64 sequences still run as one block.
    """
    per_token_bytes = max(1, kv_capacity * 2 * num_kv_heads * head_dim * 4)
    cap = max(8, (64 << 20) // per_token_bytes)
    block = min(64, cap)
    if num_tokens <= block:
        return num_tokens
    return block


def cpu_single_pass(
    num_tokens: int, num_seqs: int, kv_capacity: int, num_kv_heads: int, head_dim: int
) -> bool:
    """Whether the CPU implementation attends all tokens in one loop-free pass (each token
    gathering its own sequence's pages) instead of the reference's blocked path.

    Only where that pass reads no more than a decode step of the bucket must (T <= S), and the
    per-token page gather stays within the reference's one-block budget: beyond it (long
    page tables) the blocked path's shared-sequence blocks read far fewer pages for prefill
    chunks and for warm-up's all-padding steps.
    """
    return num_tokens <= num_seqs and num_tokens == reference_token_block(
        num_tokens, kv_capacity, num_kv_heads, head_dim
    )


def tpu_query_block(num_tokens: int, queries_per_kv: int) -> int:
    """Tokens per grid step of the TPU kernel; rows per step = tokens * queries_per_kv.

    Aims at 128 rows (one MXU pass on v5e; two row tiles of 8 x 16 on bf16) and stays a
    power of two so the block divides the padded token axis.
    """
    target_rows = 128
    block = 1
    while block * 2 * queries_per_kv <= target_rows and block * 2 <= max(num_tokens, 1):
        block *= 2
    return max(block, 8) if num_tokens >= 8 else block


def gpu_query_block(num_tokens: int, queries_per_kv: int) -> int:
    """Tokens per program of the GPU kernel (power of two, Triton block shapes must be)."""
    target_rows = 64
    block = 1
    while block * 2 * queries_per_kv <= target_rows and block * 2 <= max(num_tokens, 1):
        block *= 2
    return block


def gpu_kv_splits(pages_per_seq: int) -> int:
    """Split-KV factor: independent programs per (query block, kv head) for long contexts.

    Short contexts gain nothing from splitting (the merge costs a pass); long decode contexts
    need it to fill the GPU's SMs when there are few sequences.
    """
    if pages_per_seq >= 64:
        return 4
    if pages_per_seq >= 16:
        return 2
    return 1


# Paged GPU kernels (gpu_paged.py). Unmeasured starting points: what the first hardware run
# must sweep is listed in docs/architecture.md (kernels) and gpu_paged.py.
GPU_TARGET_PROGRAMS = 264  # two waves on an H100/H200 (132 SMs)


def gpu_decode_rows(queries_per_kv: int) -> int:
    """Rows of the decode tile: the G query heads of one kv head, padded to a power of two of
    at least 16 (the smallest bf16 tensor-core tile Triton's dot takes)."""
    return max(16, 1 << max(0, (queries_per_kv - 1).bit_length()))


def gpu_pages_per_block(page_size: int, head_dim: int) -> int:
    """Pages per gathered K/V load: ~64 keys for head_dim > 64, ~128 keys otherwise (each
    K and V tile of one block stays <= 16 KiB in bfloat16)."""
    target_keys = 64 if head_dim > 64 else 128
    return max(1, target_keys // page_size)


def gpu_decode_splits(num_seqs: int, num_kv_heads: int, kv_blocks: int) -> int:
    """Split-KV factor of the decode kernel: enough (sequence, kv head, split) programs to give
    the GPU GPU_TARGET_PROGRAMS, never a split with fewer than 2 key blocks (the merge pass and
    a split's fixed cost outweigh reading one block)."""
    wanted = -(-GPU_TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, kv_blocks // 2))


def gpu_prefill_query_block(queries_per_kv: int) -> int:
    """Tokens per prefill program: 64 rows (tokens x G padded to a power of two) per tile, at
    least one token and at least 16 rows."""
    group_padded = 1 << max(0, (queries_per_kv - 1).bit_length())
    return max(1, 64 // group_padded, -(-16 // group_padded))


def gpu_num_warps(rows: int, head_dim: int) -> int:
    """Warps per program: 4, or 8 for the widest tiles (>= 128 rows x >= 128 dims)."""
    return 8 if rows * head_dim >= 128 * 128 else 4


def gpu_num_stages() -> int:
    """Software-pipelining depth Triton gives the page-block loop (loads kept in flight)."""
    return 3


def jax_tpu_blocks_off_tpu(num_tokens: int, pages_per_seq: int) -> tuple[int, int]:
    """(kv pages, queries) per block of JAX's TPU kernel where its tuner cannot run (it reads
    the TPU generation from the device; interpret mode on CPU). On a TPU, JAX's own table picks
    them (jax_tpu.py passes None). Small blocks keep interpret mode's per-DMA cost low."""
    return min(pages_per_seq, 4), min(max(num_tokens, 1), 16)
