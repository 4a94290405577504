"""Prompt templates for the pipelines, and the check that every template variable got a value.

LangChain's own message for a missing variable lists dicts of expected/received keys; ours names the prompt,
the variable, and where to give it (a Python dict key, or `--var NAME=...` on the command line).
"""

from __future__ import annotations

from typing import Any

from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda

from .errors import PromptVariableError

RAG_SYSTEM = (
    "Answer the question in one or two sentences, using only the context below. Each passage starts with its source file in brackets. "
    "If the context does not contain the answer, say you do not know. Name the source file you used.\n\n"
    "Context:\n{context}"
)
RAG_QUESTION = "Sentence: {sentence}\nWhich question does this sentence answer?"
"""Extractive RAG scores the user's question as the reply to this, for every sentence of the retrieved passages."""
CLASSIFY_SYSTEM = (
    "Classify the text into exactly one of these labels: {labels}.\n{instructions}"
    "Reply with the label only, nothing else."
)
EXTRACT_SYSTEM = (
    "Extract information from the user's text as one JSON object with these keys and value types:\n{schema}\n"
    "{instructions}Reply with the JSON object only: no explanation, no Markdown."
)
EXTRACT_RETRY = (
    "Your reply could not be used: {error}\nReply again with only one JSON object that matches the schema."
)
SUMMARIZE_MAP = "Summarize this part of a longer text in a few sentences. Keep names, numbers and decisions.\n\n{text}"
SUMMARIZE_REDUCE = "Write a concise summary{length} of the following text.\n\n{text}"


def strict_prompt(template: ChatPromptTemplate, name: str) -> Runnable[dict[str, Any], Any]:
    """`template`, but a missing variable raises `PromptVariableError` naming `name` and the variable."""
    return require_inputs(list(template.input_variables), name) | template


def require_inputs(needed: list[str], name: str) -> Runnable[dict[str, Any], dict[str, Any]]:
    """Pass the input dict through unchanged if every name in `needed` has a value, else say which is missing."""

    def check(inputs: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(inputs, dict):
            raise PromptVariableError(
                f"prompt `{name}` needs a dict with {needed}, got {type(inputs).__name__} {str(inputs)[:80]!r}"
            )
        missing = [v for v in needed if inputs.get(v) is None]
        if missing:
            raise PromptVariableError(
                f"prompt `{name}` uses {', '.join('{' + v + '}' for v in missing)} but no value was given. "
                f"Pass {{{', '.join(repr(v) + ': ...' for v in missing)}}} to invoke(), or "
                f"{' '.join('--var ' + v + '=...' for v in missing)} on the command line. Got keys: {sorted(inputs)}."
            )
        return inputs

    return RunnableLambda(check, name=f"check_{name}_inputs")


def text_input(key: str = "text") -> Runnable[Any, dict[str, Any]]:
    """Let a pipeline be invoked with a plain string as well as with `{key: ...}`."""

    def to_dict(x: Any) -> dict[str, Any]:
        return {key: x} if isinstance(x, str) else x

    return RunnableLambda(to_dict, name=f"as_{key}_input")
