"""`LLM`: the in-process, offline API (scripts and notebooks), shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.engine_client import EngineCore
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Load a model and generate from batches of prompts.

    `model` is a HF checkpoint directory, a jaxllm (orbax) directory, or a `.gguf` file;
    None means the embedded default model. Keyword arguments are the server's flags with
    underscores (`max_num_seqs=64`, `enable_prefix_caching=False`, ...).
    """

    def __init__(self, model: str | None = None, **engine_config: Any) -> None:
        self.engine: EngineCore = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_config))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """Sampling defaults from the model's generation config (vLLM's defaults otherwise)."""
        return self.engine.default_sampling_params()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results come back in input order."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts), self.get_default_sampling_params())
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None
             ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the chat template."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = [
            self.engine.tokenizer.apply_chat_template_ids(
                list(conv), add_generation_prompt=add_generation_prompt, tools=tools,
                **(chat_template_kwargs or {}))
            for conv in conversations]
        params = _per_prompt(sampling_params, len(prompts), self.get_default_sampling_params())
        return self._run(prompts, params, use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        final_only: dict[int, SamplingParams] = {}  # one copy per distinct params object
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                if p.output_kind is not RequestOutputKind.FINAL_ONLY:
                    if id(p) not in final_only:
                        final_only[id(p)] = p.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                    p = final_only[id(p)]
                self.engine.add_request(prompt, p, rid)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while len(results) < len(ids):
                    for out in self.engine.step():
                        if out.finished and out.request_id not in results:
                            results[out.request_id] = out
                            bar.update(1)
                    if not self.engine.has_unfinished_requests() and len(results) < len(ids):
                        raise RuntimeError("engine went idle with requests unfinished")
            except BaseException:
                for rid in ids:
                    if rid not in results:
                        self.engine.abort_request(rid)
                raise
        return [results[rid] for rid in ids]

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def start_profile(self, log_dir: str | None = None) -> None:
        self.engine.start_profile(log_dir)

    def stop_profile(self) -> None:
        self.engine.stop_profile()

    def get_metrics(self) -> dict[str, Any]:
        return self.engine.get_stats().as_dict()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, str) and not (isinstance(p, list) and all(isinstance(t, int) for t in p)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
    return prompts


def _per_prompt(params, n: int, default: SamplingParams) -> list[SamplingParams]:
    if params is None:
        return [default] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError("sampling params must be SamplingParams")
    return params
