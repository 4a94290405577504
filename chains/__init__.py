"""LangChain on top of your fine-tuned runs: a chat model, and ready pipelines as plain LCEL runnables.

    from tunesmith.chains import load_chat_model, rag_chain, classify_chain
    llm = load_chat_model("embedded")            # or a run folder: load_chat_model("runs/quickstart")
    qa = rag_chain("examples/docs", llm)
    out = qa.invoke("How do I resume a training run?")
    print(out["answer"], [d.metadata["source"] for d in out["sources"]])
    print(classify_chain(llm, ["bug", "feature", "question"]).invoke("The app crashes on start"))

YAML chains in configs/chains/ run with `tunesmith chain run NAME --input ...` (see chains/config.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith import lazy_exports

if TYPE_CHECKING:
    from .chat_model import TunedChatModel, as_chat_model, load_chat_model
    from .config import ChainConfig, build_chain, load_chain_config, run_chain
    from .embeddings import MiniLMEmbeddings, default_embeddings
    from .errors import (
        ChainConfigError,
        ChainError,
        ChainModelError,
        DocumentsError,
        OutputParseError,
        PromptVariableError,
    )
    from .extract import extract_chain
    from .pipelines import classify_chain, few_shot_chain, parse_label, prompt_chain, summarize_chain
    from .rag import build_index, load_documents, rag_chain
    from .store import FaissStore

# public names load on first use (see tunesmith.lazy_exports): the CLI must start without importing torch
_WHERE = {
    "TunedChatModel": ".chat_model", "as_chat_model": ".chat_model", "load_chat_model": ".chat_model",
    "ChainConfig": ".config", "build_chain": ".config", "load_chain_config": ".config", "run_chain": ".config",
    "MiniLMEmbeddings": ".embeddings", "default_embeddings": ".embeddings", "ChainConfigError": ".errors", "ChainError": ".errors",
    "ChainModelError": ".errors", "DocumentsError": ".errors", "OutputParseError": ".errors",
    "PromptVariableError": ".errors", "extract_chain": ".extract", "classify_chain": ".pipelines",
    "few_shot_chain": ".pipelines", "parse_label": ".pipelines", "prompt_chain": ".pipelines",
    "summarize_chain": ".pipelines", "build_index": ".rag", "load_documents": ".rag", "rag_chain": ".rag",
    "FaissStore": ".store",
}

__all__ = [
    "ChainConfig", "ChainConfigError", "ChainError", "ChainModelError", "DocumentsError", "FaissStore",
    "MiniLMEmbeddings", "OutputParseError", "PromptVariableError", "TunedChatModel", "as_chat_model", "build_chain",
    "build_index", "classify_chain", "default_embeddings", "extract_chain", "few_shot_chain", "load_chain_config", "load_chat_model",
    "load_documents", "parse_label", "prompt_chain", "rag_chain", "run_chain", "summarize_chain",
]


__getattr__ = lazy_exports(__name__, _WHERE)
