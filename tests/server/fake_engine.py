"""A deterministic stand-in for `jaxllm.async_engine.AsyncEngine` (same interface), so the
server is tested in milliseconds without a model.

Tokens are bytes (ids 3..258) plus three specials. What the fake "generates":
- if the prompt contains `SAY:<text>` (up to `<|im_end|>`), it emits exactly <text> then EOS;
- if it contains `FAIL:`, it raises EngineDeadError after two tokens (mid-stream failure);
- otherwise lowercase letters/spaces from a RNG seeded by (prompt, seed, sample index) --
  fixed for greedy requests -- until max_tokens.
Stop strings, stop_token_ids, ignore_eos, n, logprobs and prompt_logprobs behave as the
real engine's contract says (a running output's text never ends in a proper prefix of a stop
string: the engine's detokenizer holds that back); aborts and early consumer exits are recorded for the tests.
Outputs follow `output_kind` (cumulative, deltas of them, or only the final one).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.errors import EngineDeadError, EngineOverloadedError
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.sampling_params import RequestOutputKind

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_IDS = {0, 2}
BYTE_OFFSET = len(SPECIALS)


class FakeTokenizer:
    """Byte-level tokenizer with ChatML-ish specials and a tiny built-in chat template."""

    vocab_size = BYTE_OFFSET + 256
    eos_token_ids = set(EOS_IDS)

    def __init__(self, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for sid, s in enumerate(SPECIALS):
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids.extend(b + BYTE_OFFSET for b in text[i].encode())
                i += 1
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < BYTE_OFFSET:
            return SPECIALS[token_id].encode()
        return bytes([token_id - BYTE_OFFSET])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], b""
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary")
            if t < BYTE_OFFSET:
                out.append(buf.decode(errors="replace"))
                buf = b""
                if not skip_special_tokens:
                    out.append(SPECIALS[t])
            else:
                buf += bytes([t - BYTE_OFFSET])
        out.append(buf.decode(errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.token_bytes(i).decode(errors="replace") for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        parts = []
        if tools:
            names = ",".join(t["function"]["name"] for t in tools)
            parts.append(f"<|im_start|>system\nTools: {names}<|im_end|>\n")
        for m in messages:
            content = m.get("content") or ""
            if m.get("tool_calls"):
                content += "".join(f"<tool_call>{c['function']['name']}</tool_call>"
                                   for c in m["tool_calls"])
            parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    page_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    compile_count: int = 3
    steps_total: int = 0
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_mean_acceptance_length: float = 0.0


def _fake_model_config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=FakeTokenizer.vocab_size,
                       hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, eos_token_ids=tuple(sorted(EOS_IDS)))


@dataclass
class FakeEngine:
    """Implements the AsyncEngine interface the server uses."""

    model_name: str = "fake-model"
    max_model_len: int = 256
    max_active: int = 1000  # more concurrent requests -> EngineOverloadedError
    token_delay_s: float = 0.0005
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    model_config: ModelConfig = field(default_factory=_fake_model_config)
    dead: bool = False
    active: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)  # ids passed to abort()
    abandoned: list[str] = field(default_factory=list)  # consumer left before the end
    finished: list[str] = field(default_factory=list)
    cache_salts: dict[str, str | None] = field(default_factory=dict)
    params_seen: dict[str, Any] = field(default_factory=dict)  # request id -> SamplingParams
    prefix_cache_resets: int = 0
    _abort_flags: set[str] = field(default_factory=set)

    @classmethod
    async def from_config(cls, config: EngineConfig) -> FakeEngine:
        return cls(engine_config=config)

    async def generate(self, prompt: str | list[int], sampling_params: Any, request_id: str, *,
                       cache_salt: str | None = None, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        sp = sampling_params
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = sp.max_tokens if sp.max_tokens is not None else self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len {self.max_model_len}")
        if request_id in self.active:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self.active) >= self.max_active:
            raise EngineOverloadedError("fake queue full", retry_after_s=2.0)
        self.active.add(request_id)
        self.cache_salts[request_id] = cache_salt
        self.params_seen[request_id] = sp
        done = False
        kind = sp.output_kind
        sent: dict[int, tuple[int, int]] = {}  # DELTA: (characters, tokens) sent per sample
        sent_prompt = 0
        try:
            async for out in self._run(ids, sp, request_id, max_tokens):
                done = out.finished
                if kind is RequestOutputKind.FINAL_ONLY and not done:
                    continue
                if kind is RequestOutputKind.DELTA:
                    out = _delta(out, sent, sent_prompt)
                    sent_prompt += len(out.prompt_logprobs or [])
                yield out
        finally:
            self.active.discard(request_id)
            self._abort_flags.discard(request_id)
            (self.finished if done else self.abandoned).append(request_id)

    def _script(self, prompt_text: str, sp: Any, index: int, max_tokens: int) -> list[int]:
        tok = self.tokenizer
        if "SAY:" in prompt_text:
            said = prompt_text.rsplit("SAY:", 1)[1].split("<|im_end|>", 1)[0]
            return tok.encode(said, add_special_tokens=False) + [0]
        greedy = sp.temperature == 0
        seed = sp.seed if sp.seed is not None else (0 if greedy else random.getrandbits(32))
        digest = hashlib.sha256(f"{prompt_text}|{seed}|{0 if greedy else index}".encode())
        rng = random.Random(digest.digest())
        alphabet = "abcdefghij klmnop qrstuvwxyz "
        return [ord(rng.choice(alphabet)) + BYTE_OFFSET for _ in range(max_tokens)]

    @staticmethod
    def _position_logprobs(chosen: int, k: int) -> dict[int, Logprob]:
        d = {chosen: Logprob(-0.25, 1, None)}
        alt = (chosen + 1 - BYTE_OFFSET) % 256 + BYTE_OFFSET
        for rank in range(2, k + 1):
            while alt in d:
                alt = (alt + 1 - BYTE_OFFSET) % 256 + BYTE_OFFSET
            d[alt] = Logprob(-1.0 * rank, rank, None)
        return d

    async def _run(self, ids: list[int], sp: Any, rid: str, max_tokens: int
                   ) -> AsyncIterator[RequestOutput]:
        tok = self.tokenizer
        prompt_text = tok.decode(ids, skip_special_tokens=False)
        scripts = [self._script(prompt_text, sp, i, max_tokens) for i in range(sp.n)]
        outs = [CompletionOutput(index=i) for i in range(sp.n)]
        stops = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        prompt_lps = None
        if sp.prompt_logprobs is not None:
            prompt_lps = [None] + [self._position_logprobs(t, sp.prompt_logprobs) for t in ids[1:]]
        if "FAIL:" in prompt_text:
            scripts = [s[:2] for s in scripts]
        step = 0
        while True:
            await asyncio.sleep(self.token_delay_s)
            if self.dead or ("FAIL:" in prompt_text and step == 2):
                raise EngineDeadError("fake engine died mid-request")
            if rid in self._abort_flags:
                for o in outs:
                    o.finish_reason = o.finish_reason or "abort"
                yield RequestOutput(rid, None, ids, outs, finished=True, prompt_logprobs=prompt_lps)
                return
            for o, script in zip(outs, scripts, strict=True):
                if o.finished:
                    continue
                t = script[step] if step < len(script) else ord("z") + BYTE_OFFSET
                self._append(o, t, sp, stops, max_tokens)
            step += 1
            finished = all(o.finished for o in outs)
            yield RequestOutput(rid, None, ids, [_copy(o) for o in outs], finished=finished,
                                prompt_logprobs=prompt_lps)
            if finished:
                return

    def _append(self, o: CompletionOutput, t: int, sp: Any, stops: list[str],
                max_tokens: int) -> None:
        o.token_ids.append(t)
        if sp.logprobs is not None:
            o.logprobs = (o.logprobs or []) + [self._position_logprobs(t, sp.logprobs)]
        if (t in EOS_IDS and not sp.ignore_eos) or t in (sp.stop_token_ids or []):
            o.finish_reason, o.stop_reason = "stop", (None if t in EOS_IDS else t)
            o.text = self.tokenizer.decode(o.token_ids[:-1], sp.skip_special_tokens)
            return
        o.text = self.tokenizer.decode(o.token_ids, sp.skip_special_tokens)
        for s in stops:
            pos = o.text.find(s)
            if pos >= 0:
                o.text = o.text[: pos + (len(s) if sp.include_stop_str_in_output else 0)]
                o.finish_reason, o.stop_reason = "stop", s
                return
        if len(o.token_ids) >= max_tokens:
            o.finish_reason = "length"
            return
        o.text = o.text[: len(o.text) - _stop_prefix_len(o.text, stops)]

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        if request_id in self.active:
            self._abort_flags.add(request_id)
            return True
        return False

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("fake engine is dead")

    async def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1

    def get_stats(self) -> FakeStats:
        return FakeStats(num_running=len(self.active))

    async def wait_for_requests_to_drain(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self.active and (end is None or loop.time() < end):
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        self.dead = True


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


def _copy(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(o.index, o.text, list(o.token_ids), None,
                            list(o.logprobs) if o.logprobs is not None else None,
                            o.finish_reason, o.stop_reason)


def _delta(out: RequestOutput, sent: dict[int, tuple[int, int]], sent_prompt: int
           ) -> RequestOutput:
    """The part of a cumulative output not sent yet; `sent` advances."""
    parts = []
    for o in out.outputs:
        chars, tokens = sent.get(o.index, (0, 0))
        sent[o.index] = (len(o.text), len(o.token_ids))
        parts.append(CompletionOutput(
            o.index, o.text[chars:], o.token_ids[tokens:], o.cumulative_logprob,
            None if o.logprobs is None else o.logprobs[tokens:], o.finish_reason,
            o.stop_reason))
    prompt_lps = None if out.prompt_logprobs is None else out.prompt_logprobs[sent_prompt:]
    return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, parts, out.finished,
                         prompt_lps, out.metrics)
