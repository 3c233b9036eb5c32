"""The server's structured-output inputs -> one `StructuredOutputsParams` (or None).

OpenAI's `response_format` (json_object, json_schema), vLLM's extra body fields
(`structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`), and
tool calls that must happen (`tool_choice: "required"` or a named function): those are
constrained to the Hermes block the tool parser reads, continuing the opening the chat
handler already put in the prompt, with each tool's parameters as a JSON schema. Shape
errors are 400s here; a schema/regex/grammar the engine cannot compile is its ValueError
(also a 400), raised before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

from jaxllm.structured.compiler import JSON_COMPILE_DEFAULTS
from jaxllm.structured.spec import StructuredOutputsParams

from .errors import bad_request
from .tool_parser import TOOL_CLOSE

ANY_OBJECT = {"type": "object"}


def structured_spec(*, response_format: Any = None, structured_outputs: Any = None,
                    guided_json: Any = None, guided_regex: str | None = None,
                    guided_choice: list[str] | None = None,
                    guided_grammar: str | None = None) -> StructuredOutputsParams | None:
    """The one spec a request asks for; 400 when it asks for several or one is malformed."""
    specs: list[tuple[str, StructuredOutputsParams]] = []
    try:
        rf = _from_response_format(response_format)
        if rf is not None:
            specs.append(("response_format", rf))
        so = StructuredOutputsParams.coerce(structured_outputs)
        if so is not None:
            specs.append(("structured_outputs", so))
        guided = StructuredOutputsParams.from_guided(
            guided_json=guided_json, guided_regex=guided_regex, guided_choice=guided_choice,
            guided_grammar=guided_grammar)
        if guided is not None:
            specs.append(("guided_*", guided))
    except ValueError as e:
        raise bad_request(str(e), param="response_format" if response_format else None) from e
    if len(specs) > 1:
        raise bad_request("set one of response_format, structured_outputs, guided_*; got "
                          + ", ".join(name for name, _ in specs))
    return specs[0][1] if specs else None


def _from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    body = rf.json_schema
    if not isinstance(body, dict) or "schema" not in body:
        raise bad_request("response_format json_schema needs a json_schema object with a "
                          "'schema'", param="response_format")
    schema = body["schema"]
    if not isinstance(schema, dict):
        raise bad_request("response_format json_schema.schema must be a JSON object",
                          param="response_format")
    return StructuredOutputsParams(json=schema)


def tool_call_spec(tools: list[Any], tool_choice: Any, forced_prefix: str
                   ) -> StructuredOutputsParams | None:
    """The output of a tool call that must happen, after `forced_prefix` (the block's opening,
    already in the prompt): for a named function its arguments and the block's end; for
    "required", one of the tools' names, then its arguments and the end."""
    if not forced_prefix:
        return None
    by_name = {t.function.name: t.function.parameters or ANY_OBJECT for t in tools}
    end = json.dumps("}\n" + TOOL_CLOSE)
    if forced_prefix.endswith('"arguments": '):  # named: the name is in the prompt
        name = tool_choice.function.name
        lark = f"start: args {end}\nargs: %json {_schema_text(by_name[name])}\n"
    else:  # required: the prompt ends with '{"name": "'
        rules = [f"start: {' | '.join(f'call_{i}' for i in range(len(by_name)))}"]
        for i, (name, params) in enumerate(by_name.items()):
            head = json.dumps(json.dumps(name)[1:] + ', "arguments": ')
            rules.append(f"call_{i}: {head} args_{i} {end}")
            rules.append(f"args_{i}: %json {_schema_text(params)}")
        lark = "\n".join(rules) + "\n"
    return StructuredOutputsParams(grammar=lark)


def _schema_text(schema: dict[str, Any]) -> str:
    """The schema with the engine's JSON layout options (the schema's own win)."""
    options = dict(JSON_COMPILE_DEFAULTS)
    options.update(schema.get("x-guidance") or {})
    return json.dumps({**schema, "x-guidance": options})
