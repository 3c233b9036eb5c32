"""How a request speculates: the mode, how many tokens it proposes, the n-gram window and the
back-off rule. One frozen dataclass, validated on construction (ValueError for bad values),
so the CLI flags, `LLM(...)` keywords and the engine all share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECULATIVE_MODES = ("disable", "ngram", "draft", "eagle")
MAX_SPECULATIVE_TOKENS = 16  # a verification chunk is k + 1 query tokens per sequence


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings.

    mode: "disable", "ngram" (prompt lookup), "draft" (a small model) or "eagle" (a head on
      the target's hidden states); draft and eagle need `model` (HF-format weights).
    num_speculative_tokens: k, the most tokens proposed per step (verification feeds k + 1).
    ngram_min / ngram_max: the n-gram proposer matches the longest suffix of n tokens, n from
      ngram_max down to ngram_min, found earlier in prompt + output.
    backoff_window, min_acceptance_rate, backoff_steps, max_backoff_steps: the per-request
      back-off rule (`jaxllm.spec.backoff.SpeculationBackoff`): after `backoff_window`
      verifications whose accepted / proposed is below `min_acceptance_rate`, the request
      decodes without proposals for `backoff_steps` steps, doubling on each consecutive
      failure up to `max_backoff_steps`, then probes again.
    disable_above_batch: no sequence speculates in a step with more running sequences than
      this (None: no limit); at large batch a step is no longer bound by reading the weights,
      so verifying proposals costs real compute.
    """

    mode: str = "disable"
    num_speculative_tokens: int = 4
    model: str | None = None
    ngram_min: int = 2
    ngram_max: int = 4
    backoff_window: int = 4
    min_acceptance_rate: float = 0.2
    backoff_steps: int = 8
    max_backoff_steps: int = 128
    disable_above_batch: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise ValueError(f"speculative mode must be one of {', '.join(SPECULATIVE_MODES)}, "
                             f"got {self.mode!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if self.mode in ("draft", "eagle") and not self.model:
            raise ValueError(f"speculative mode {self.mode!r} needs a speculative model "
                             f"(--speculative-model PATH)")
        if self.mode in ("disable", "ngram") and self.model:
            raise ValueError(f"a speculative model is only used by the draft and eagle modes, "
                             f"not {self.mode!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got ngram_min {self.ngram_min}"
                             f", ngram_max {self.ngram_max}")
        if self.backoff_window < 1:
            raise ValueError(f"backoff_window must be >= 1, got {self.backoff_window}")
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(f"min_acceptance_rate must be in [0, 1], got "
                             f"{self.min_acceptance_rate}")
        if not 0 <= self.backoff_steps <= self.max_backoff_steps:
            raise ValueError(f"need 0 <= backoff_steps <= max_backoff_steps, got "
                             f"{self.backoff_steps} and {self.max_backoff_steps}")
        if self.disable_above_batch is not None and self.disable_above_batch < 1:
            raise ValueError(f"disable_above_batch must be >= 1, got {self.disable_above_batch}")

    @property
    def enabled(self) -> bool:
        return self.mode != "disable"

    def proposal_cap(self, num_tokens: int, num_output_tokens: int, max_tokens: int,
                     max_model_len: int) -> int:
        """Most drafts a request may verify now: a verification emits up to drafts + 1
        tokens, which must fit in both max_tokens and max_model_len (0: plain decode)."""
        room = min(max_tokens - num_output_tokens, max_model_len - num_tokens) - 1
        return max(0, min(self.num_speculative_tokens, room))

    def speculates_at(self, batch_size: int) -> bool:
        """Whether sequences propose at all in a step with `batch_size` running sequences."""
        return self.enabled and (self.disable_above_batch is None
                                 or batch_size <= self.disable_above_batch)


def check_speculative_model_path(model: str | None, mode: str = "draft") -> None:
    """ValueError unless `model` names a checkpoint the `mode`'s proposer can be loaded from.
    Draft: an existing HF directory (config.json), converted jaxllm directory or .gguf file,
    or a hub id `org/name[@revision]` (resolved when the engine loads it). EAGLE: an existing
    directory with config.json (HF format). Reads no weights."""
    if not model:
        raise ValueError(f"speculative mode {mode!r} needs --speculative-model PATH")
    path = Path(model).expanduser()
    if not path.exists():
        from jaxllm.hub import parse_hub_id

        if mode == "eagle" or parse_hub_id(model) is None:
            raise ValueError(f"--speculative-model {model}: no such file or directory")
        return
    if mode == "eagle":
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(f"--speculative-model {model}: an EAGLE head is a directory with "
                             "config.json and safetensors weights (no config.json there)")
        return
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "jaxllm_config.json").is_file()):
            raise ValueError(f"--speculative-model {model}: not a model directory (no "
                             "config.json)")
    elif path.suffix != ".gguf":
        raise ValueError(f"--speculative-model {model}: not a model directory or a .gguf file")
