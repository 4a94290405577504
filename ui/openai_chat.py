"""OpenAI chat protocol features beyond plain text, for `/v1/chat/completions`: `response_format`, `tools` /
`tool_choice`, and the `logprobs` object. Request in, `GenerationParams` pieces and a prompt out; completion in,
OpenAI's response pieces out. The route itself (ui/server.py) stays about admission, batching and streaming.

Structured output is grammar-constrained decoding (`GenerationParams.json_schema`, lm-format-enforcer), so even a
small model's reply parses and follows the schema, unless `max_tokens` cuts it first (finish_reason "length").
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tunesmith.finetune import Completion, GeneratedLogprob, Generator


class RequestError(ValueError):
    """A request the server cannot honour; answered 400 with `param` naming the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema decoding is held to for `response_format` (None: free text).

    `json_object` is any JSON object; `json_schema` is the given schema. `strict` is honoured either way: the
    grammar only lets the model write what the schema allows."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError('response_format.json_schema.schema must be a JSON schema object, e.g. {"type": '
                               '"json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", ...}}}.',
                               "response_format.json_schema.schema")
        check_schema(schema, "response_format.json_schema.schema")
        return schema
    raise RequestError(f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
                       "response_format.type")


_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Refuse, with a 400, a schema the grammar cannot follow: lm-format-enforcer builds its parser lazily and, on
    an unknown type or a dangling `$ref` met mid-answer, ends the answer there (broken JSON, no error)."""
    from lmformatenforcer import JsonSchemaParser

    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        types = node.get("type", [])
        for t in types if isinstance(types, list) else [types]:
            if t not in _TYPES:
                raise RequestError(f"{param}: {where} has type {t!r}; JSON schema types are {sorted(_TYPES)}.", param)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.split("/")[-1] not in defs:
            raise RequestError(f"{param}: {where} refers to {ref!r}, which the schema's top-level `$defs` lacks "
                               "(only local references are followed).", param)
        for key in ("properties", "$defs", "definitions"):
            for name, sub in (node.get(key) or {}).items():
                walk(sub, f"{where}.{key}.{name}")
        for key in ("anyOf", "oneOf", "allOf"):
            for i, sub in enumerate(node.get(key) or []):
                walk(sub, f"{where}.{key}[{i}]")
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{where}.{key}")

    walk(schema, "schema")
    try:
        JsonSchemaParser(schema)
    except Exception as e:  # pydantic's error for a malformed schema
        raise RequestError(f"{param} is not a JSON schema this server can follow ({type(e).__name__}: "
                           f"{str(e)[:300]}). Give an object schema, such as a Pydantic model's model_json_schema().",
                           param) from None


def supports_tools(gen: Generator) -> bool:
    """Whether the model's chat template renders a `tools` list (Qwen 2.5, Llama 3.1, Hermes...); ChatML as
    SmolLM2 ships it and as tunesmith trains with does not, and a tool list it silently drops would mislead."""
    template = gen.tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


@dataclass
class ToolPlan:
    """How a request with `tools` is answered: `prompt` rendered with the tools; `schema` forces a call (None:
    the model may answer in text or with a call, `tool_choice: "auto"`); `names` the tools it may call."""

    prompt: str
    schema: dict[str, Any] | None
    names: list[str]


def plan_tools(gen: Generator, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               tool_choice: str | dict[str, Any] | None) -> ToolPlan | None:
    """None when the request has no tools to offer (none given, or `tool_choice: "none"`); else the plan, or a
    RequestError when the model cannot use tools or the choice names an unknown one."""
    if not tools or tool_choice == "none":
        return None
    if not supports_tools(gen):
        raise RequestError(f"{gen.name}'s chat template has no tool support (it does not render `tools`), so it "
                           "cannot call functions. Leave out `tools`, or use structured output instead: "
                           "response_format={'type': 'json_schema', ...} (LangChain: with_structured_output(Schema, "
                           "method='json_schema')).", "tools")
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                               "{...}}}}; other tool types are not supported.", f"tools[{i}]")
        functions[fn["name"]] = fn
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str) or name not in functions:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools ({sorted(functions)}).",
                               "tool_choice")
        chosen = [name]
    elif tool_choice in (None, "auto", "required"):
        chosen = list(functions)
    else:
        raise RequestError(f"tool_choice {tool_choice!r} is not one of 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}.", "tool_choice")
    # list(): transformers types `tools` as list[dict | Callable], which a list[dict] is not (lists are invariant)
    prompt = gen.tokenizer.apply_chat_template(messages, tools=list(tools), tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)  # tokenize=False renders text; transformers types the result of every mode
    forced = tool_choice not in (None, "auto")
    schema = _call_schema([functions[n] for n in chosen]) if forced else None
    if schema is not None:
        check_schema(schema, "tools")
    return ToolPlan(prompt, schema, chosen)


def _call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"name": ..., "arguments": {...}}` for one of `functions`, each name with its own parameters' schema.

    Nested models' `$defs` move to the top: lm-format-enforcer resolves `$ref` against the root schema only."""
    options: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for fn in functions:
        params = dict(fn.get("parameters") or {"type": "object"})
        for name, definition in params.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise RequestError(f"Two tools define different `$defs` named {name!r}; rename one of the models.",
                                   "tools")
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs} if defs else schema


def tool_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` if `text` is a call of one of the plan's tools (bare JSON, or inside Hermes/Qwen
    `<tool_call>` tags as tool templates teach), else None: with `tool_choice: "auto"` that is a text answer."""
    body = text.strip()
    if body.startswith("<tool_call>"):
        body = body.removeprefix("<tool_call>").split("</tool_call>")[0].strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in plan.names:
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(args if isinstance(args, dict) else {})}}]


def tool_fields(m: Any) -> dict[str, Any]:
    """A message's tool parts for the chat template: assistant `tool_calls` (arguments as objects, as HF templates
    expect) and a `tool` result's call id and name."""
    out: dict[str, Any] = {}
    if m.tool_calls:
        out["tool_calls"] = [_template_call(c) for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def check_tool_messages(gen: Generator, messages: list[dict[str, Any]]) -> None:
    """A tool result or tool call in the conversation needs a template that renders them."""
    for i, m in enumerate(messages):
        if (m["role"] == "tool" or m.get("tool_calls")) and not supports_tools(gen):
            raise RequestError(f"messages[{i}] is a tool call or result, but {gen.name}'s chat template has no tool "
                               "support. Send the result as a user message instead.", f"messages[{i}]")


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}


def logprobs_json(entries: list[GeneratedLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs` object (`{"content": [...]}`), or None when they were not asked for."""
    if entries is None:
        return None
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, v, b in e.top]}
                        for e in entries], "refusal": None}


def choice_json(index: int, out: Completion, plan: ToolPlan | None, finish: str) -> dict[str, Any]:
    """One entry of a chat completion's `choices`: a text answer, or `tool_calls` when the reply is a call."""
    calls = tool_calls(out.text, plan) if plan else None
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else out.text}
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message, "finish_reason": "tool_calls" if calls else finish,
            "logprobs": logprobs_json(out.logprobs)}


def usage_json(outs: list[Completion]) -> dict[str, int]:
    """The prompt counts once however many choices (`n`) were generated from it, as OpenAI bills it."""
    prompt, completion = outs[0].prompt_tokens, sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
