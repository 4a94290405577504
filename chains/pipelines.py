"""The small ready pipelines: classification, map-reduce summarisation, few-shot and plain prompt chains.

Each is a few LCEL steps; the functions that do the real work (`parse_label`, `split_text`) are pure, so their
behaviour is tested exactly without a model.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, FewShotChatMessagePromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_text_splitters import RecursiveCharacterTextSplitter

from .chat_model import TunedChatModel, to_chat
from .errors import OutputParseError
from .prompts import CLASSIFY_SYSTEM, SUMMARIZE_MAP, SUMMARIZE_REDUCE, require_inputs, strict_prompt, text_input


def classify_chain(model: BaseChatModel, labels: list[str], *, instructions: str = "",
                   examples: list[tuple[str, str]] | None = None,
                   fallback: str | None = None) -> Runnable[str | dict[str, Any], str]:
    """Text (or `{"text": ...}`) -> one of `labels`, exactly as spelled there.

    `examples` are (text, label) pairs shown as earlier turns. On a `TunedChatModel` every label is scored as the
    reply (its log-probability, `Generator.score`) and the most likely one wins: the answer is always a label, and
    a 135M model that would ramble when generating still ranks the labels well. Other chat models generate a
    reply that is matched to a label (`parse_label`); a reply naming no label gives `fallback`, or raises
    `OutputParseError` if there is none.
    """
    if len(set(labels)) < 2:
        raise ValueError(f"classify_chain needs at least two different labels, got {labels}")
    if fallback is not None and fallback not in labels:
        raise ValueError(f"fallback {fallback!r} is not one of the labels {labels}")
    prompt = classify_prompt(labels, instructions=instructions, examples=examples)

    def to_label(reply: str) -> str:
        label = parse_label(reply, labels) or fallback
        if label is None:
            raise OutputParseError(f"the reply {reply[:200]!r} names none of the labels {labels}. Give examples=, "
                                   "a fallback= label, or use a model fine-tuned on the task.")
        return label

    if isinstance(model, TunedChatModel):
        return text_input("text") | strict_prompt(prompt, "classify") | _most_likely_label(model, labels)
    return text_input("text") | strict_prompt(prompt, "classify") | _short(model, 24) | StrOutputParser() | to_label


def classify_prompt(labels: list[str], *, instructions: str = "",
                    examples: list[tuple[str, str]] | None = None) -> ChatPromptTemplate:
    """The classification prompt ({text} is the input): also what training data for a tuned classifier should use
    (examples/chains/build_train.py), so the run learns exactly the prompt it is asked with."""
    shots = [m for text, label in examples or [] for m in (("human", _escape(text)), ("ai", _escape(label)))]
    return ChatPromptTemplate.from_messages([("system", CLASSIFY_SYSTEM), *shots, ("human", "{text}")]).partial(
        labels=", ".join(labels), instructions=f"{instructions.strip()}\n" if instructions.strip() else "")


def _most_likely_label(model: TunedChatModel, labels: list[str]) -> Runnable[PromptValue, str]:
    """The label whose tokens (through the end of the turn) the model finds most likely as its reply.

    Summed, not averaged per token: a label's end-of-turn token already says "the reply stops here", and a mean
    would favour long labels whose later tokens are near-certain once begun. The shipped labels are one token each,
    so on examples/chains/classify_eval.jsonl both rank alike (15 of 36 with the embedded model)."""

    def pick(prompt: PromptValue) -> str:
        chat = to_chat(prompt.to_messages())
        scores = model._gen().score([chat], labels, use_adapter=model.use_adapter)[0]
        return labels[max(range(len(labels)), key=scores.__getitem__)]

    return RunnableLambda(pick, name="most_likely_label")


def parse_label(reply: str, labels: list[str]) -> str | None:
    """Find the label in a free-form reply: exact, then the earliest label mentioned as a word, then a close spelling.

    'Label: Positive.' -> 'positive'; '**negative**' -> 'negative'; 'neutrel' -> 'neutral'.
    When two labels are mentioned, the first one wins ('positive, not negative' -> 'positive'); for labels where
    one contains another ('spam', 'not spam'), the longer match at the same place wins.
    """
    norm = {_norm(lab): lab for lab in labels}
    text = _norm(reply)
    if text in norm:
        return norm[text]
    hits = [(m.start(), -len(key), lab) for key, lab in norm.items()
            for m in [re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text)] if key and m]
    if hits:
        return min(hits)[2]
    words = text.split()
    for n in (3, 2, 1):  # labels of up to three words, misspelt
        grams = [" ".join(words[i: i + n]) for i in range(len(words) - n + 1)]
        for g in grams:
            close = difflib.get_close_matches(g, list(norm), n=1, cutoff=0.8)
            if close:
                return norm[close[0]]
    return None


def summarize_chain(model: BaseChatModel, *, chunk_size: int = 2000, chunk_overlap: int = 100,
                    max_words: int | None = None, max_rounds: int = 3) -> Runnable[str | dict[str, Any], str]:
    """Long text (or `{"text": ...}`) -> summary, map-reduce style.

    Map: the text is split into `chunk_size`-character parts, summarised all at once with `batch` (one padded
    generate call for a TunedChatModel). Reduce: the part summaries are summarised together; if they are still too
    long for one prompt they are mapped again, at most `max_rounds` times. Short text goes straight to reduce.
    """
    summarize_part = ChatPromptTemplate.from_messages([("human", SUMMARIZE_MAP)]) | model | StrOutputParser()
    length = f" in at most {max_words} words" if max_words else ""
    reduce = (ChatPromptTemplate.from_messages([("human", SUMMARIZE_REDUCE)]).partial(length=length)
              | model | StrOutputParser())

    def map_reduce(inputs: dict[str, Any], config: RunnableConfig) -> str:
        parts = split_text(str(inputs["text"]), chunk_size, chunk_overlap)
        for _ in range(max_rounds):
            if len(parts) <= 1:
                break
            summaries = summarize_part.batch([{"text": p} for p in parts], config)
            parts = split_text("\n\n".join(s.strip() for s in summaries), chunk_size, 0)
        return reduce.invoke({"text": "\n\n".join(parts)}, config).strip()

    return text_input("text") | require_inputs(["text"], "summarize") | RunnableLambda(map_reduce, name="map_reduce")


def split_text(text: str, chunk_size: int, chunk_overlap: int = 0) -> list[str]:
    """Paragraphs first, then lines, sentences, words: each part at most `chunk_size` characters."""
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                              separators=["\n\n", "\n", ". ", " ", ""])
    return splitter.split_text(text) or [text]


def few_shot_chain(model: BaseChatModel, examples: list[dict[str, str]], *, instructions: str = "",
                   input_key: str = "input", output_key: str = "output") -> Runnable[str | dict[str, Any], str]:
    """Teach by example: each `{input_key: ..., output_key: ...}` becomes a user turn and the answer to it.

    Text in `instructions` and in the examples may use `{variables}`; they are then required inputs.
    """
    if not examples:
        raise ValueError("few_shot_chain needs at least one example")
    for i, ex in enumerate(examples):
        if set(ex) != {input_key, output_key}:
            raise ValueError(f"example {i} must have exactly the keys {input_key!r} and {output_key!r}, got {sorted(ex)}")
    shots = FewShotChatMessagePromptTemplate(
        examples=[{"q": ex[input_key], "a": ex[output_key]} for ex in examples],
        example_prompt=ChatPromptTemplate.from_messages([("human", "{q}"), ("ai", "{a}")]),
    )
    system = [("system", instructions)] if instructions.strip() else []
    prompt = ChatPromptTemplate.from_messages([*system, shots, ("human", f"{{{input_key}}}")])
    return text_input(input_key) | strict_prompt(prompt, "few_shot") | model | StrOutputParser()


def prompt_chain(model: BaseChatModel, template: str, *, system: str = "",
                 input_key: str = "input") -> Runnable[str | dict[str, Any], str]:
    """The plainest chain: fill `template` (`{variables}`), ask, return the text. A plain string fills `input_key`."""
    prompt = ChatPromptTemplate.from_messages([*([("system", system)] if system else []), ("human", template)])
    return text_input(input_key) | strict_prompt(prompt, "prompt") | model | StrOutputParser()


def _short(model: BaseChatModel, max_tokens: int) -> Runnable[Any, Any]:
    """Labels are a few tokens: cap a tuned model's answer length (other chat models keep their own settings)."""
    return model.bind(max_tokens=max_tokens) if isinstance(model, TunedChatModel) else model


def _norm(s: str) -> str:
    s = re.sub(r"^\s*(label|category|class|answer)\s*[:=-]\s*", "", s.strip().lower())
    return " ".join(re.sub(r"[^\w\s-]", " ", s).split())


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
