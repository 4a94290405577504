"""tunesmith: fine-tune a causal LM with LoRA on your data, then chat, serve and chain it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A PEP 562 module `__getattr__` that imports a public name from its submodule on first use.

    The subpackages re-export their API at the top (`from tunesmith.chains import rag_chain`), but importing
    torch, transformers and LangChain eagerly made `tunesmith --help` take ~5 s.
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


DECODE_WEIGHTS_HELP = ("transformers engine: auto (default) decodes from int8 copies of the weights on a CPU (about "
                       "1.6x the tokens/s, answers very close to exact; long prompts and scoring stay exact), exact elsewhere")
"""One help text for `tunesmith chat|serve|ui --decode-weights` (finetune/quantize.py has the measurements)."""
COMPILE_DECODE_HELP = ("transformers engine: decode answers (single and batched) through a compiled step over a static "
                       "KV cache (CPU: ~1.9x the tokens/s of one int8 stream); compiled while the model loads: ~30 s, "
                       "~2.5 min the first time")
"""One help text for `tunesmith chat|serve|ui --compile-decode` (finetune/fastdecode.py has the measurements)."""
PREFIX_CACHE_MIB = 256
"""The prefix cache's default budget (finetune/prefixes.py): ~5,700 tokens of SmolLM2-135M in fp32 (46 KiB a token),
~4,600 of a Qwen2.5-7B-shaped model in bf16 (56 KiB a token). Here, not in finetune, so the CLI's help needs no torch."""
PREFIX_CACHE_HELP = ("transformers engine: memory (MiB) for keys/values of recent prompts and answers, reused by the "
                     "next prompt that starts with them: a chat's next turn, a shared system prompt (0: off)")
"""One help text for `tunesmith chat|serve|ui --prefix-cache-mib` (finetune/prefixes.py)."""
PREFILL_CHUNK_HELP = ("transformers engine: while answers stream, a new prompt is prefilled at most this many tokens at "
                      "a time, a decode step between each, so a long prompt does not stall the others (default: 256 "
                      "on a CPU, 2048 on a GPU; larger: the long prompt's first token sooner, longer stalls)")
"""One help text for `tunesmith serve|ui --prefill-chunk` (finetune/continuous.py has the measurements)."""


EXTRAS: dict[str, tuple[str, ...]] = {
    "chains": ("langchain_core", "langchain", "langchain_text_splitters", "faiss"),
    "ui": ("gradio", "fastapi", "uvicorn", "langchain_core", "langchain", "langchain_text_splitters", "faiss"),
    "export": ("xllamacpp",),
    "trackers": ("tensorboard", "mlflow"),
    "bench": ("trl",),
}
"""The modules each optional extra of pyproject.toml installs: the core (training, eval, merge, chat) needs none."""


class MissingExtraError(ImportError):
    """A command needs an optional part that is not installed; the message names the extra to install."""

    def __init__(self, extra: str, modules: list[str], what: str) -> None:
        super().__init__(f"{what} needs {', '.join(modules)}, from the optional [{extra}] extra: "
                         f"pip install 'tunesmith[{extra}]'")


def extra_of(module: str | None) -> str | None:
    """The extra that installs `module` (a dotted name is looked up by its top-level package), or None."""
    top = (module or "").partition(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def require_extra(extra: str, what: str) -> None:
    """Stop before any work (loading a model takes seconds) when `extra`'s packages are missing, naming the fix;
    an ImportError deep inside a command would name a module, not what to install."""
    from importlib.util import find_spec

    def absent(module: str) -> bool:
        try:
            return find_spec(module) is None
        except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
            return True

    missing = [m for m in EXTRAS[extra] if absent(m)]
    if missing:
        raise MissingExtraError(extra, missing, what)
