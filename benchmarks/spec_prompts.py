"""Prompts for measuring speculative decoding, and the n-gram proposer's acceptance on a
model's greedy output.

    python benchmarks/spec_prompts.py [--max-tokens 128] [--num-speculative-tokens 4]
        [--ngram-min 2] [--ngram-max 4] [--no-backoff] [--outputs FILE]

Two sets of chat prompts: COPY_HEAVY (rewrite, extract, continue-a-list, edit code: the answer
repeats long stretches of the prompt, where prompt lookup should shine) and NO_COPY (open
answers with nothing to copy, where speculation must back off and cost nothing). Greedy
speculative decoding emits exactly the greedy output, so replaying the proposer over a greedy
output (`replay_ngram_speculation`) gives the acceptance a speculating engine would see, and
its verification step count, without any speculation in the engine. The script runs the
default model greedily over both sets and prints that per prompt; the speed benchmark (tok/s
with and without speculation) comes with the engine wiring. `--outputs FILE` keeps the greedy
outputs (JSON): an existing file is replayed without loading the model, so proposer settings
can be compared in seconds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxllm.spec.backoff import SpeculationBackoff
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.ngram import NgramProposer

_PARAGRAPH = (
    "Our support team answers every customer request within two business days. When a "
    "customer reports a problem with an order, the team first checks the order history, "
    "then contacts the warehouse, and finally writes back to the customer with a clear plan. "
    "Customers who need urgent help can call the support line between 8 am and 6 pm."
)

_CODE = '''def average_score(scores):
    total = 0
    count = 0
    for score in scores:
        if score is not None:
            total = total + score
            count = count + 1
    if count == 0:
        return 0
    return total / count'''

_LOG = """2024-03-01 09:12:44 INFO  server started on port 8080
2024-03-01 09:13:02 WARN  disk usage at 81 percent
2024-03-01 09:15:37 ERROR failed to connect to database: timeout after 30 s
2024-03-01 09:15:40 INFO  retrying database connection
2024-03-01 09:15:41 ERROR failed to connect to database: connection refused
2024-03-01 09:16:10 INFO  database connection established
2024-03-01 09:20:55 ERROR request /api/orders returned status 500"""

_JSON = """{"name": "Ada Lovelace", "born": 1815, "city": "London",
 "known_for": ["Analytical Engine notes", "first published algorithm"],
 "languages": ["English", "French"], "children": 3}"""

_TABLE = """| city | country | population (millions) |
|---|---|---|
| Tokyo | Japan | 37.4 |
| Delhi | India | 31.0 |
| Shanghai | China | 27.1 |
| Sao Paulo | Brazil | 22.0 |
| Mexico City | Mexico | 21.8 |"""

COPY_HEAVY: dict[str, str] = {
    "rewrite-word": "Rewrite the following paragraph, replacing the word \"customer\" with "
                    f"\"client\" everywhere. Change nothing else.\n\n{_PARAGRAPH}",
    "extract-errors": "Copy every line of this log that contains ERROR, exactly as it is, "
                      f"one per line.\n\n{_LOG}",
    "continue-list": "Continue this list in exactly the same format up to item 12.\n\n"
                     "1. Item 1: buy milk at the corner shop on Monday\n"
                     "2. Item 2: buy bread at the corner shop on Tuesday\n"
                     "3. Item 3: buy eggs at the corner shop on Wednesday\n"
                     "4. Item 4: buy apples at the corner shop on Thursday\n",
    "repeat-code": "Repeat this Python function exactly, with a comment line above it that "
                   f"says what it does.\n\n```python\n{_CODE}\n```",
    "json-to-yaml": f"Convert this JSON object to YAML.\n\n{_JSON}",
    "table-row": "Copy this table exactly and add a row for Cairo, Egypt, 21.3.\n\n" + _TABLE,
    "sort-names": "Sort these names alphabetically, one per line: Olivia Martinez, Liam "
                  "Johnson, Emma Williams, Noah Brown, Ava Jones, Elijah Garcia, Sophia Miller, "
                  "James Davis, Isabella Rodriguez, Lucas Wilson",
    "quote-answer": f"{_PARAGRAPH}\n\nQuote the sentence of the text above that says when "
                    "customers can call, then quote the sentence about what the team does "
                    "first.",
}

NO_COPY: dict[str, str] = {
    "poem": "Write a short poem about the sea at night.",
    "sky": "Explain why the sky is blue.",
    "language-tips": "Give three tips for learning a new language.",
    "robot-story": "Tell a short story about a robot who learns to paint.",
    "exercise": "What are the benefits of regular exercise?",
    "weekend": "Describe a perfect weekend in the mountains.",
    "recipe": "Invent a recipe that uses apples and cheese.",
    "exam": "Write an encouraging message for a student before an exam.",
}


@dataclass
class AcceptanceStats:
    """What n-gram speculation would have done over one (or several summed) outputs."""

    tokens: int = 0  # output tokens emitted
    steps: int = 0  # verification steps (a plain decode counts as one)
    proposing_steps: int = 0  # steps that proposed at least one token
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per proposing step (accepted + the corrected/bonus token)."""
        return ((self.accepted + self.proposing_steps) / self.proposing_steps
                if self.proposing_steps else 0.0)

    @property
    def tokens_per_step(self) -> float:
        """The step-count speed-up bound over plain decoding (one token per step)."""
        return self.tokens / self.steps if self.steps else 0.0

    def __add__(self, other: AcceptanceStats) -> AcceptanceStats:
        return AcceptanceStats(self.tokens + other.tokens, self.steps + other.steps,
                               self.proposing_steps + other.proposing_steps,
                               self.proposed + other.proposed, self.accepted + other.accepted)


def replay_ngram_speculation(prompt_ids: Sequence[int], output_ids: Sequence[int],
                             config: SpeculativeConfig, *, backoff: bool = True
                             ) -> AcceptanceStats:
    """Step through `output_ids` (a greedy output of `prompt_ids`) as a speculating engine
    would: each step proposes up to k tokens from prompt + output so far (none past the end
    of the output), keeps the proposal's longest prefix that agrees with the output and
    emits one more token."""
    k = config.num_speculative_tokens
    proposer = NgramProposer(config)
    state = SpeculationBackoff.from_config(config) if backoff else None
    history = list(prompt_ids)
    stats = AcceptanceStats()
    position = 0
    while position < len(output_ids):
        budget = state.proposal_length(k) if state is not None else k
        budget = min(budget, len(output_ids) - position - 1)
        proposal = (proposer.propose("replay", history, budget).tolist() if budget > 0 else [])
        accepted = 0
        for token, actual in zip(proposal, output_ids[position:], strict=False):
            if token != actual:
                break
            accepted += 1
        if proposal:
            stats.proposing_steps += 1
            stats.proposed += len(proposal)
            stats.accepted += accepted
            if state is not None:
                state.record(len(proposal), accepted)
        emitted = output_ids[position:position + accepted + 1]
        history.extend(emitted)
        position += len(emitted)
        stats.steps += 1
        stats.tokens += len(emitted)
    return stats


def greedy_outputs(max_tokens: int, max_model_len: int) -> dict[str, list[dict]]:
    """The default model's greedy replies to both sets: {set: [{name, prompt_token_ids,
    output_token_ids, text}]}."""
    from jaxllm import LLM
    from jaxllm.sampling_params import SamplingParams

    llm = LLM(max_model_len=max_model_len, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    result = {}
    for set_name, prompts in (("copy", COPY_HEAVY), ("no-copy", NO_COPY)):
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts.values()], params,
                        use_tqdm=False)
        result[set_name] = [dict(name=name, prompt_token_ids=list(o.prompt_token_ids),
                                 output_token_ids=list(o.outputs[0].token_ids),
                                 text=o.outputs[0].text)
                            for name, o in zip(prompts, outs, strict=True)]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--no-backoff", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--outputs", type=Path, default=None,
                        help="JSON of greedy outputs: replayed if it exists, else written")
    args = parser.parse_args(argv)
    config = SpeculativeConfig(mode="ngram", num_speculative_tokens=args.num_speculative_tokens,
                               ngram_min=args.ngram_min, ngram_max=args.ngram_max)
    if args.outputs is not None and args.outputs.exists():
        outputs = json.loads(args.outputs.read_text())
    else:
        outputs = greedy_outputs(args.max_tokens, args.max_model_len)
        if args.outputs is not None:
            args.outputs.write_text(json.dumps(outputs, indent=1))
    print(f"n-gram speculation, k={config.num_speculative_tokens}, n in "
          f"[{config.ngram_min}, {config.ngram_max}], back-off {'off' if args.no_backoff else 'on'}")
    print(f"{'set':10} {'prompt':16} {'tokens':>6} {'steps':>6} {'proposed':>8} "
          f"{'accepted':>8} {'rate':>5} {'tok/step':>8}")
    for set_name, replies in outputs.items():
        total = AcceptanceStats()
        for reply in replies:
            s = replay_ngram_speculation(reply["prompt_token_ids"], reply["output_token_ids"],
                                         config, backoff=not args.no_backoff)
            total = total + s
            print(f"{set_name:10} {reply['name']:16} {s.tokens:6d} {s.steps:6d} {s.proposed:8d} "
                  f"{s.accepted:8d} {s.acceptance_rate:5.2f} {s.tokens_per_step:8.2f}")
        print(f"{set_name:10} {'(all)':16} {total.tokens:6d} {total.steps:6d} "
              f"{total.proposed:8d} {total.accepted:8d} {total.acceptance_rate:5.2f} "
              f"{total.tokens_per_step:8.2f}")


if __name__ == "__main__":
    main()
