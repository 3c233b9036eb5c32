"""The fixed set of step shapes (tokens, sequences, page-table width) the runner compiles.

Every distinct shape is one XLA compilation of the whole model, so the set stays small:
- token buckets T: `min_token_bucket` times powers of `token_bucket_ratio` (2 by default)
  up to max_num_batched_tokens (which is itself included even when not such a power). On XLA
  CPU a step's cost barely grows from 8 to 32 tokens (weight reads dominate) while each bucket
  costs a compile, so a ratio of 4 there nearly halves warm-up (benchmarks/step_profile.py).
  max_num_seqs is added as a bucket so a full decode batch never pads to a bigger one, and
  optionally 1: on XLA CPU a lone decode's step costs ~30% less at 1 token than padded to 8
  (matrix-vector products and an 8-row LM head);
- the sequence bucket is tied to T: S = min(T, max_num_seqs) (a step never has more
  sequences than tokens);
- page-table widths P: `min_page_width` times powers of `page_width_ratio` below
  ceil(max_model_len / page_size), which is always included, so short-context steps gather
  few pages (attention cost grows with S * P * page_size).
The set is the product T x P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int
    num_seqs: int
    pages_per_seq: int


class BucketSet:
    """All step shapes for one engine configuration; `pick` maps a step onto the smallest."""

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int,
        *,
        min_token_bucket: int = 8,
        token_bucket_ratio: int = 2,
        page_width_ratio: int = 4,
        min_page_width: int = 16,
        single_token_bucket: bool = False,
    ) -> None:
        for name, v in (("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                        ("page_size", page_size), ("min_token_bucket", min_token_bucket),
                        ("min_page_width", min_page_width)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if token_bucket_ratio < 2:
            raise ValueError(f"token_bucket_ratio must be >= 2, got {token_bucket_ratio}")
        if page_width_ratio < 2:
            raise ValueError(f"page_width_ratio must be >= 2, got {page_width_ratio}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.page_size = page_size

        tokens: list[int] = []
        t = min(min_token_bucket, max_num_batched_tokens)
        while t < max_num_batched_tokens:
            tokens.append(t)
            t *= token_bucket_ratio
        tokens.append(max_num_batched_tokens)
        if tokens[0] < max_num_seqs < max_num_batched_tokens:
            tokens.append(max_num_seqs)  # a full decode batch gets a bucket of exactly its size
        if single_token_bucket:
            tokens.append(1)  # one sequence decoding alone
        self.token_buckets: tuple[int, ...] = tuple(sorted(set(tokens)))

        # Anchored at the narrow end: the common short contexts get the same narrow widths
        # whatever max_model_len is (a top-anchored ladder gave max_model_len=512 a 32-page
        # table for a 192-token context: twice the attention work of a 16-page one).
        widest = -(-max_model_len // page_size)
        widths = {widest}
        w = min_page_width
        while w < widest:
            widths.add(w)
            w *= page_width_ratio
        self.page_widths: tuple[int, ...] = tuple(sorted(widths))

    @classmethod
    def from_engine_config(cls, config: Any, *, max_model_len: int, page_size: int,
                           **kwargs: Any) -> BucketSet:
        """From an EngineConfig whose max_model_len / page_size were resolved by the caller."""
        return cls(config.max_num_batched_tokens, config.max_num_seqs, max_model_len, page_size,
                   **kwargs)

    def seqs_for(self, num_tokens_bucket: int) -> int:
        return min(num_tokens_bucket, self.max_num_seqs)

    def pick(self, num_tokens: int, num_seqs: int, max_pages: int) -> Bucket:
        """Smallest bucket holding num_tokens tokens of num_seqs sequences whose longest page
        list has max_pages pages."""
        if num_tokens < 1 or num_seqs < 1 or num_seqs > num_tokens:
            raise ValueError(f"bad step: {num_tokens} tokens, {num_seqs} sequences")
        for t in self.token_buckets:
            if t >= num_tokens and self.seqs_for(t) >= num_seqs:
                break
        else:
            raise ValueError(f"step of {num_tokens} tokens / {num_seqs} sequences exceeds the "
                             f"largest bucket ({self.token_buckets[-1]} tokens, "
                             f"{self.seqs_for(self.token_buckets[-1])} sequences)")
        for p in self.page_widths:
            if p >= max_pages:
                break
        else:
            raise ValueError(f"{max_pages} pages per sequence exceed the widest page table "
                             f"({self.page_widths[-1]})")
        return Bucket(t, self.seqs_for(t), p)

    def all(self) -> list[Bucket]:
        """Every bucket, smallest first (what warm-up compiles)."""
        return [Bucket(t, self.seqs_for(t), p) for t in self.token_buckets for p in self.page_widths]

    def __len__(self) -> int:
        return len(self.token_buckets) * len(self.page_widths)

    def describe(self) -> str:
        seqs = sorted({self.seqs_for(t) for t in self.token_buckets})
        return (f"{len(self)} step buckets: tokens {list(self.token_buckets)} "
                f"(seqs = min(tokens, {self.max_num_seqs}) -> {seqs}) x pages/seq "
                f"{list(self.page_widths)} (page_size {self.page_size})")
