"""What a request constrains its output to: one of a JSON schema, any JSON object, a regex,
a list of choices or a Lark/EBNF grammar (vLLM's `StructuredOutputsParams`).

Pure data with no grammar-engine import, so `SamplingParams` can hold it; `cache_key` is the
spec in canonical text, the key of the compiled-grammar cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SPEC_FIELDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one field set. json: a JSON schema (dict or its JSON text); json_object: any
    JSON object; regex: the whole output matches it; choice: the output is one of the strings;
    grammar: Lark (llguidance's dialect) or GBNF/EBNF text."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in SPEC_FIELDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, "
                             f"grammar, json_object; got {chosen or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("the JSON schema must be a JSON object")
            object.__setattr__(self, "json", schema)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a list of strings")
            if not self.choice:
                raise ValueError("structured_outputs.choice must not be empty")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be true when set")

    @property
    def kind(self) -> str:
        return next(name for name in SPEC_FIELDS if getattr(self, name) not in (None, False))

    @property
    def cache_key(self) -> str:
        """Canonical text of the spec: equal specs (any key order) share one compiled grammar."""
        return json.dumps([self.kind, getattr(self, self.kind)], sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def from_guided(cls, *, guided_json: Any = None, guided_regex: str | None = None,
                    guided_choice: list[str] | None = None, guided_grammar: str | None = None,
                    guided_json_object: bool | None = None) -> StructuredOutputsParams | None:
        """The older `guided_*` twins; None when none is set."""
        given = {"json": guided_json, "regex": guided_regex, "choice": guided_choice,
                 "grammar": guided_grammar, "json_object": guided_json_object or None}
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise ValueError("set at most one of guided_json, guided_regex, guided_choice, "
                             f"guided_grammar; got {sorted('guided_' + k for k in given)}")
        return cls(**given)

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """From an instance, a dict of its fields (a JSON body) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(SPEC_FIELDS) - {"disable_any_whitespace",
                                                             "disable_fallback",
                                                             "disable_additional_properties",
                                                             "whitespace_pattern", "backend"})
            if unknown:
                raise ValueError(f"unknown structured_outputs field(s): {unknown}")
            return cls(**{k: value[k] for k in SPEC_FIELDS if value.get(k) is not None})
        raise ValueError("structured_outputs must be an object with one of "
                         f"{', '.join(SPEC_FIELDS)}")
