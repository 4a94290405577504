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
