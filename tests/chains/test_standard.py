"""LangChain's standard chat-model test suites, run against TunedChatModel on the tiny random run."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from tunesmith.chains import TunedChatModel


class _TinyParams:
    """Shared by both suites: the tiny run's loaded Generator (loading once keeps `test_init_time` honest)."""

    @pytest.fixture(autouse=True)
    def _share_generator(self, tiny_gen: Any) -> None:
        type(self)._generator = tiny_gen

    @property
    def chat_model_class(self) -> type[TunedChatModel]:
        return TunedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"generator": type(self)._generator, "model": "tiny-run"}

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per TunedChatModel; load_chat_model() another one instead


class TestTunedChatModelUnit(_TinyParams, ChatModelUnitTests):
    pass


class TestTunedChatModelIntegration(_TinyParams, ChatModelIntegrationTests):
    # the suite's `async def` tests expect pytest-asyncio's auto mode; pyproject keeps strict mode, so mark the class
    # (the mark on its sync tests only makes pytest-asyncio warn, which is silenced here)
    pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")]

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**super().chat_model_params, "max_tokens": 8}  # 8 tokens of gibberish: fast, never empty

    @property
    def has_structured_output(self) -> bool:
        # implemented (decoding constrained to the schema), but in 8 tokens a random model's JSON is cut off;
        # tests/chains/test_chat_model.py and test_small_model.py cover it with room to finish
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return False
