"""Schemas of the native (SGLang-shaped) `/generate` endpoint."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class NativeSamplingParams(_Lenient):
    max_new_tokens: int | None = Field(128, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    # Structured output (SGLang's names): a JSON schema (as text), a regex, an EBNF grammar.
    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None


class GenerateRequest(_Lenient):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0)
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    stream: bool = False
    cache_salt: str | None = None
    priority: int = 0


class AbortRequest(_Lenient):
    rid: str
