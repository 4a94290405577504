"""Structured extraction into a Pydantic schema, for models without tool calling or constrained decoding.

The schema goes into the system message as JSON schema; the reply is parsed (first JSON object in it, Markdown
fences tolerated) and validated. When that fails the model sees its own reply and the exact error and tries again,
which is what turns a 135M model's near-miss JSON (a missing field, a string for an int) into a valid object.
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

from .errors import OutputParseError
from .prompts import EXTRACT_RETRY, EXTRACT_SYSTEM, strict_prompt, text_input

Schema = type[BaseModel] | dict[str, Any]


def extract_chain(model: BaseChatModel, schema: type[BaseModel], *, instructions: str = "",
                  max_retries: int = 2) -> Runnable[str | dict[str, Any], BaseModel]:
    """Text (or `{"text": ...}`) -> an instance of `schema`.

    Raises `OutputParseError` (with the last reply and error) when `max_retries` retries did not give valid JSON.
    """
    prompt = ChatPromptTemplate.from_messages([("system", EXTRACT_SYSTEM), ("human", "{text}")]).partial(
        schema=schema_json(schema), instructions=_line(instructions))
    return text_input("text") | strict_prompt(prompt, "extract") | _parse_with_retry(model, schema, max_retries)


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
    def run(prompt: PromptValue | list[BaseMessage], config: RunnableConfig) -> Any:
        history = _to_messages(prompt)
        for _attempt in range(max_retries + 1):
            reply = model.invoke(history, config)
            try:
                parsed = parse_json_reply(reply.text, schema)
            except OutputParseError as e:
                error = e
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
