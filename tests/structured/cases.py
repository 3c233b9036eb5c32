"""The structured-output test set: JSON schemas and regexes, each small enough that every
output completes within a modest max_tokens (strings, arrays and numbers are bounded), and a
checker that an output text satisfies its spec."""

from __future__ import annotations

import json
import re

import jsonschema

from jaxllm.structured.spec import StructuredOutputsParams


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 12}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}

SCHEMAS: list[dict] = [
    _obj({"name": NAME, "age": AGE}),
    _obj({"city": NAME, "population": {"type": "integer", "minimum": 1, "maximum": 99999999}}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 10}}),
    _obj({"temperature": {"type": "integer", "minimum": -40, "maximum": 50},
          "unit": {"enum": ["C", "F"]}}),
    _obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                   "minItems": 1, "maxItems": 3}}),
    _obj({"numbers": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                 "maximum": 99}, "maxItems": 4}}),
    _obj({"person": _obj({"first": NAME, "last": NAME})}),
    _obj({"order": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                         "item": _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                       "qty": {"type": "integer", "minimum": 1, "maximum": 9}})})}),
    _obj({"title": NAME, "subtitle": NAME}, required=["title"]),
    _obj({"a": {"type": "integer", "minimum": 0, "maximum": 9},
          "b": {"type": "integer", "minimum": 0, "maximum": 9},
          "c": {"type": "boolean"}}, required=["a"]),
    _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                              {"type": "string", "maxLength": 6}]}}),
    _obj({"pet": {"anyOf": [_obj({"kind": {"const": "cat"}, "lives": {"type": "integer",
                                                                        "minimum": 1, "maximum": 9}}),
                            _obj({"kind": {"const": "dog"}, "good": {"type": "boolean"}})]}}),
    _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    _obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}}),
    _obj({"matrix": {"type": "array", "maxItems": 2,
                     "items": {"type": "array", "maxItems": 2,
                               "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
    _obj({"people": {"type": "array", "minItems": 1, "maxItems": 2, "items": _obj({"name": NAME,
                                                                                 "age": AGE})}}),
    _obj({"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
                                                        "maximum": 599},
          "message": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}}),
    {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
    {"enum": ["alpha", "beta", 3, None]},
]

REGEXES: list[str] = [
    r"\d{3}-\d{4}",
    r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"#[0-9a-f]{6}",
    r"([01]\d|2[0-3]):[0-5]\d",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{2,8}",
    r"(\d{1,3}\.){3}\d{1,3}",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|net)",
    r"-?\d{1,4}(\.\d{1,2})?",
    r"[A-Z]{2}\d{2} [A-Z]{3}",
]


def all_specs() -> list[StructuredOutputsParams]:
    return ([StructuredOutputsParams(json=s) for s in SCHEMAS]
            + [StructuredOutputsParams(regex=r) for r in REGEXES])


def prompt_for(spec: StructuredOutputsParams) -> str:
    if spec.json is not None:
        return f"Reply with JSON matching this schema: {json.dumps(spec.json)}"
    return f"Reply with a string matching the regular expression {spec.regex}"


def satisfies(spec: StructuredOutputsParams, text: str, grammar_regex: str | None = None) -> bool:
    """The text parses and validates (JSON schema) or fully matches (regex / choice; a
    grammar: `grammar_regex`, a regex the test knows to be equivalent)."""
    if spec.json is not None or spec.json_object:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        schema = spec.json if spec.json is not None else {"type": "object"}
        return jsonschema.Draft202012Validator(schema).is_valid(value)
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    if spec.grammar is not None and grammar_regex is not None:
        return re.fullmatch(grammar_regex, text) is not None
    raise ValueError(f"no checker for {spec.kind}")
