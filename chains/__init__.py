"""LangChain on top of your fine-tuned runs: a chat model, and ready pipelines as plain LCEL runnables.

    from tunesmith.chains import load_chat_model, rag_chain, classify_chain
    llm = load_chat_model("embedded")            # or a run folder: load_chat_model("runs/quickstart")
    qa = rag_chain("examples/docs", llm)
    out = qa.invoke("How do I resume a training run?")
    print(out["answer"], [d.metadata["source"] for d in out["sources"]])
    print(classify_chain(llm, ["bug", "feature", "question"]).invoke("The app crashes on start"))

YAML chains in configs/chains/ run with `tunesmith chain run NAME --input ...` (see chains/config.py).
"""

from .chat_model import TunedChatModel, as_chat_model, load_chat_model
from .config import ChainConfig, build_chain, load_chain_config, run_chain
from .embeddings import MiniLMEmbeddings
from .errors import ChainConfigError, ChainError, ChainModelError, DocumentsError, OutputParseError, PromptVariableError
from .extract import extract_chain
from .pipelines import classify_chain, few_shot_chain, parse_label, prompt_chain, summarize_chain
from .rag import build_index, load_documents, rag_chain
from .store import FaissStore

__all__ = [
    "ChainConfig", "ChainConfigError", "ChainError", "ChainModelError", "DocumentsError", "FaissStore",
    "MiniLMEmbeddings", "OutputParseError", "PromptVariableError", "TunedChatModel", "as_chat_model", "build_chain",
    "build_index", "classify_chain", "extract_chain", "few_shot_chain", "load_chain_config", "load_chat_model",
    "load_documents", "parse_label", "prompt_chain", "rag_chain", "run_chain", "summarize_chain",
]
