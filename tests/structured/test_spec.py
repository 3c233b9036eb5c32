"""StructuredOutputsParams and its SamplingParams spellings: exactly one spec, validated."""

from __future__ import annotations

import pytest

from jaxllm.sampling_params import SamplingParams
from jaxllm.structured.spec import StructuredOutputsParams


def test_guided_twins_map_onto_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [(dict(guided_json=schema), StructuredOutputsParams(json=schema)),
             (dict(guided_json='{"type": "string"}'), StructuredOutputsParams(json={"type": "string"})),
             (dict(guided_regex=r"\d+"), StructuredOutputsParams(regex=r"\d+")),
             (dict(guided_choice=["a", "b"]), StructuredOutputsParams(choice=("a", "b"))),
             (dict(guided_grammar='root ::= "x"'), StructuredOutputsParams(grammar='root ::= "x"')),
             (dict(structured_outputs={"json_object": True}),
              StructuredOutputsParams(json_object=True))]
    for kwargs, expected in cases:
        params = SamplingParams(**kwargs)
        assert params.structured_outputs == expected
        assert params.has_structured_output
        assert params.guided_json is None and params.guided_regex is None
        assert params.clone(max_tokens=5).structured_outputs == expected  # clone keeps it


def test_cache_key_ignores_key_order():
    a = StructuredOutputsParams(json={"type": "object", "required": ["x"], "properties": {}})
    b = StructuredOutputsParams(json='{"properties": {}, "required": ["x"], "type": "object"}')
    assert a.cache_key == b.cache_key
    assert a.cache_key != StructuredOutputsParams(regex="x").cache_key


@pytest.mark.parametrize("kwargs, message", [
    (dict(guided_regex="a", guided_choice=["b"]), "at most one"),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "exactly one"),
    (dict(structured_outputs={}), "exactly one"),
    (dict(structured_outputs={"json": "{not json"}), "not valid JSON"),
    (dict(structured_outputs={"json": "[1, 2]"}), "JSON object"),
    (dict(structured_outputs={"choice": []}), "must not be empty"),
    (dict(structured_outputs={"choice": "ab"}), "list of strings"),
    (dict(structured_outputs={"regex": ""}), "non-empty"),
    (dict(structured_outputs={"shape": "x"}), "unknown structured_outputs"),
    (dict(structured_outputs={"regex": "a"}, guided_regex="b"), "not both"),
    (dict(structured_outputs=42), "must be an object"),
])
def test_bad_specs_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
