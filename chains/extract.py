"""Structured extraction into a Pydantic schema, for models without tool calling.

The schema goes into the system message as a compact outline. On a `TunedChatModel` decoding is constrained to
JSON of the schema (`GenerationParams.json_schema`, lm-format-enforcer): a 135M model cannot write a wrong type
or a missing key, only a wrong value. Every field that may be null is required in the decoding schema, so the
model has to decide about each one (`"age": null`) instead of closing the object early.
For other chat models the reply is parsed (first JSON object in it, Markdown fences tolerated) and validated;
when that fails the model sees its own reply and the exact error and tries again.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from pydantic import BaseModel, ValidationError

from .chat_model import TunedChatModel
from .errors import OutputParseError
from .prompts import EXTRACT_RETRY, EXTRACT_SYSTEM, strict_prompt, text_input

Schema = type[BaseModel] | dict[str, Any]


def extract_chain(model: BaseChatModel, schema: type[BaseModel], *, instructions: str = "",
                  max_retries: int = 2) -> Runnable[str | dict[str, Any], BaseModel]:
    """Text (or `{"text": ...}`) -> an instance of `schema`.

    Raises `OutputParseError` (with the last reply and error) when `max_retries` retries did not give valid JSON.
    """
    prompt = extract_prompt(schema, instructions=instructions)
    return text_input("text") | strict_prompt(prompt, "extract") | _parse_with_retry(model, schema, max_retries)


def extract_prompt(schema: Schema, *, instructions: str = "") -> ChatPromptTemplate:
    """The extraction prompt ({text} is the input), shared with examples/chains/build_train.py so a tuned run
    learns exactly the prompt it is asked with."""
    return ChatPromptTemplate.from_messages([("system", EXTRACT_SYSTEM), ("human", "{text}")]).partial(
        schema=schema_json(schema), instructions=_line(instructions))


def structured_runnable(model: BaseChatModel, schema: Schema, *, max_retries: int = 2,
                        include_raw: bool = False) -> Runnable[LanguageModelInput, Any]:
    """What `TunedChatModel.with_structured_output` returns: any chat input -> a schema instance (or a dict)."""

    def add_schema(x: LanguageModelInput) -> list[BaseMessage]:
        msgs = _to_messages(x)
        note = EXTRACT_SYSTEM.format(schema=schema_json(schema), instructions="")
        if msgs and isinstance(msgs[0], SystemMessage):  # many chat templates allow one system turn, first
            return [SystemMessage(f"{msgs[0].text}\n\n{note}"), *msgs[1:]]
        return [SystemMessage(note), *msgs]

    return RunnableLambda(add_schema, name="add_json_schema") | _parse_with_retry(model, schema, max_retries,
                                                                                   include_raw)


def _parse_with_retry(model: BaseChatModel, schema: Schema, max_retries: int,
                      include_raw: bool = False) -> Runnable[Any, Any]:
    constrained = isinstance(model, TunedChatModel)
    llm: Runnable[Any, BaseMessage] = model
    if constrained:
        # no repetition penalty: copying from the text is the task (with 1.1 the embedded model got 50 of the 99
        # fields of examples/chains/extract_eval.jsonl right instead of 81: the penalty kept it from the age)
        llm = model.bind(json_schema=decoding_schema(schema), repetition_penalty=1.0)

    def run(prompt: PromptValue | list[BaseMessage], config: RunnableConfig) -> Any:
        history = _to_messages(prompt)
        for _attempt in range(max_retries + 1):
            reply = llm.invoke(history, config)
            try:
                parsed = parse_json_reply(reply.text, schema)
            except OutputParseError as e:
                error = e
                # isinstance (= constrained) also tells mypy the model has max_tokens
                if isinstance(model, TunedChatModel) and reply.response_metadata.get("finish_reason") == "length":
                    error = OutputParseError(f"{e} The JSON was cut off at max_tokens={model.max_tokens}: raise "
                                             "max_tokens (params.max_new_tokens in a chain YAML).")
                history = [*history, reply, HumanMessage(EXTRACT_RETRY.format(error=e))]
                continue
            return {"raw": reply, "parsed": parsed, "parsing_error": None} if include_raw else parsed
        if include_raw:
            return {"raw": reply, "parsed": None, "parsing_error": error}
        raise OutputParseError(
            f"no valid {_schema_name(schema)} after {max_retries + 1} tries. Last error: {error} "
            f"Last reply: {reply.text[:300]!r}. Try a larger or fine-tuned model, simpler field names, "
            "or more max_retries."
        )

    return RunnableLambda(run, name="parse_json_with_retry")


def parse_json_reply(text: str, schema: Schema) -> Any:
    """The first JSON object in `text`, validated against `schema`; `OutputParseError` says what was wrong."""
    obj = first_json_object(text)
    if obj is None:
        raise OutputParseError("the reply contains no JSON object (expected {...}).")
    if isinstance(schema, dict):
        missing = [k for k in schema.get("required", []) if k not in obj]
        if missing:
            raise OutputParseError(f"the JSON object lacks the required field(s) {missing}.")
        return obj
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'object'}: {err['msg']}" for err in e.errors())
        raise OutputParseError(f"the JSON does not match the schema ({problems}).") from None


MAX_STRING = 200
"""Characters a string field may hold in constrained decoding unless the schema sets `maxLength`: inside a string
any character is valid JSON, and a small model that never writes the closing quote would run to max_tokens."""


def decoding_schema(schema: Schema) -> dict[str, Any]:
    """The JSON schema decoding is held to: `schema`'s, with every property that may be null made required (the
    model writes `null` rather than closing the object early) and strings capped at MAX_STRING characters."""
    full = json.loads(json.dumps(schema if isinstance(schema, dict) else schema.model_json_schema()))
    props = full.get("properties") or {}
    nullable = [k for k, p in props.items() if "null" in json.dumps(p.get("type")) or
                any(o.get("type") == "null" for o in p.get("anyOf", []))]
    required = {*full.get("required", []), *nullable}
    full["required"] = [k for k in props if k in required]  # in the schema's order, as the prompt's outline shows them
    for prop in props.values():
        for option in [prop, *prop.get("anyOf", []), prop.get("items") or {}]:
            if option.get("type") == "string":
                option.setdefault("maxLength", MAX_STRING)
    return full


def first_json_object(text: str) -> dict[str, Any] | None:
    """Scan for the first `{` that starts a complete JSON object; tolerates prose and ```json fences around it."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def schema_json(schema: Schema) -> str:
    """A compact `{"field": "type"}` outline: small models copy an outline far better than a full JSON schema."""
    full = schema if isinstance(schema, dict) else schema.model_json_schema()
    props = full.get("properties")
    if not props:
        return json.dumps(full, separators=(",", ":"))
    required = set(full.get("required", []))
    outline = {name: _type_name(p) for name, p in props.items()}
    return json.dumps({k: t if k in required or "null" in t else f"{t} or null" for k, t in outline.items()})


def _type_name(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(dict.fromkeys(_type_name(p) for p in prop["anyOf"]))
    if prop.get("type") == "array":
        return f"list of {_type_name(prop.get('items', {}))}"
    return str(prop.get("type", "object"))


def _schema_name(schema: Schema) -> str:
    return str(schema.get("title", "JSON object")) if isinstance(schema, dict) else schema.__name__


def _to_messages(x: Any) -> list[BaseMessage]:
    if isinstance(x, PromptValue):
        return x.to_messages()
    if isinstance(x, str):
        return [HumanMessage(x)]
    return list(convert_to_messages(x))


def _line(text: str) -> str:
    return f"{text.strip()}\n" if text and text.strip() else ""
