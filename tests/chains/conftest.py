"""Chain fixtures: the real TunedChatModel on the tiny random run, and a scripted fake chat model for pipeline logic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


class ScriptedChatModel(BaseChatModel):
    """Replies from a list (cycling), and records every conversation it was sent, for asserting on prompts."""

    replies: list[str]
    seen: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        reply = self.replies[(len(self.seen) - 1) % len(self.replies)]
        return ChatResult(generations=[ChatGeneration(message=AIMessage(reply))])


@pytest.fixture
def scripted() -> Iterator[type[ScriptedChatModel]]:
    """`scripted(replies=[...])` builds a fake model; `.seen` holds the prompts it got."""
    yield lambda replies: ScriptedChatModel(replies=replies, seen=[])


@pytest.fixture(scope="session")
def tiny_chat(tiny_gen):
    """Greedy, 12 new tokens: deterministic gibberish, enough to test the mechanics."""
    from tunesmith.chains import load_chat_model

    return load_chat_model(tiny_gen, max_tokens=12)


@pytest.fixture(scope="session")
def docs_dir() -> Path:
    return DOCS


@pytest.fixture(scope="session")
def minilm():
    from tunesmith.chains.embeddings import default_embeddings

    return default_embeddings()

