"""Chain mode's two jobs outside the UI: keep uploaded files safe, and make the one call into `chains/`.

Uploaded files come from strangers' browsers. They are only ever read as text: copied, under a cleaned name,
into a folder of the session's own; anything that is not a small UTF-8 text file of an allowed kind is refused
with the reason shown to the user. Nothing uploaded is imported, executed, or opened by path from the request.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document

from tunesmith.finetune import GenerationParams, Generator

ALLOWED_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".csv", ".json", ".jsonl", ".html", ".htm", ".py")
"""Text formats only (a `.py` file is indexed as text, never run)."""
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 20


@dataclass
class DocAnswer:
    answer: str
    sources: list[str]
    """One line per retrieved passage: `file: first words of the passage`."""


def new_session_folder() -> str:
    return tempfile.mkdtemp(prefix="tunesmith-docs-")


def remove_session_folder(folder: str | None) -> None:
    """Called by Gradio when a session ends (tab closed), so uploads do not pile up on the server."""
    if folder and Path(folder).name.startswith("tunesmith-docs-"):
        shutil.rmtree(folder, ignore_errors=True)


def store_uploads(paths: list[str], folder: str | Path, max_bytes: int = MAX_FILE_BYTES,
                  suffixes: tuple[str, ...] = ALLOWED_SUFFIXES, max_files: int = MAX_FILES,
                  what: str = "only text files ({}) are indexed", done: str = "indexed",
                  binary: tuple[str, ...] = ()) -> list[str]:
    """Copy acceptable uploads into `folder`; return one message per file saying stored or why refused. The
    chat's documents and the Train tab's data files both come through here (`what` / `done` word the messages;
    `binary` suffixes, e.g. Parquet, skip the UTF-8 check). A file of a name already stored replaces it."""
    folder = Path(folder)
    report = []
    stored = set(list_documents(folder))
    for p in paths:
        src = Path(p)
        name = _clean_name(src.name)
        size = src.stat().st_size if src.is_file() else -1
        if not name.lower().endswith(suffixes):
            report.append(f"{src.name}: refused, {what.format(', '.join(suffixes))}")
        elif size < 0 or size > max_bytes:
            report.append(f"{src.name}: refused, {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.1f} MB limit")
        elif len(stored) >= max_files and name not in stored:
            report.append(f"{src.name}: refused, at most {max_files} files per session (start a new session)")
        elif not name.lower().endswith(binary) and not _is_utf8_text(src):
            report.append(f"{src.name}: refused, not UTF-8 text")
        else:
            shutil.copyfile(src, folder / name)  # a copy: never a link to wherever the upload landed
            stored.add(name)
            report.append(f"{name}: {done} ({size / 1e3:.1f} kB)")
    return report


def list_documents(folder: str | Path | None) -> list[str]:
    """The uploaded files (the chain's index lives in the hidden `.index` beside them)."""
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def ask_documents(gen: Generator, folder: str | Path, question: str, params: GenerationParams, *,
                  extractive: bool = True, on_token: Callable[[str], None] | None = None) -> DocAnswer:
    """Answer `question` from the documents in `folder` with the retrieval chain of `tunesmith.chains`.

    `extractive` quotes the passage sentence the model finds most likely (the chain's default: the most accurate
    answer a small model gives, and `params`' sampling plays no part); otherwise the answer is generated with
    `params`, and `on_token` gets its text as it streams. An exception raised by `on_token` ends the generation
    at once (that is how Stop reaches it) and propagates."""
    from tunesmith.chains import load_chat_model, rag_chain

    chat = load_chat_model(gen).with_params(params)
    if on_token is not None:
        chat = chat.model_copy(update={"streaming": True})  # `invoke` then reports each token to the callbacks
    # the index goes inside the session folder, so it is deleted with it (and rebuilt only when uploads change)
    chain = rag_chain(folder, chat, index_dir=Path(folder) / ".index", suffixes=ALLOWED_SUFFIXES,
                      extractive=extractive)
    callbacks: list[BaseCallbackHandler] = [_TokenSink(on_token)] if on_token is not None else []
    result = chain.invoke(question, config={"callbacks": callbacks})
    return DocAnswer(str(result["answer"]), [_source_line(s) for s in result["sources"]])


class _TokenSink(BaseCallbackHandler):
    raise_error = True
    """LangChain swallows callback errors by default; Stop needs its exception to end the generation."""

    def __init__(self, on_token: Callable[[str], None]) -> None:
        self.on_token = on_token

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], **kwargs: Any) -> None:
        if isinstance(token, str):  # a list of content blocks comes from other chat models, never TunedChatModel's
            self.on_token(token)


def _source_line(doc: Document) -> str:
    """A retrieved passage as one line: `file: first words` (the rag chain names every passage's file)."""
    return f"{Path(doc.metadata['source']).name}: {' '.join(doc.page_content.split())[:160]}"


def _clean_name(name: str) -> str:
    """Only the last path part, in safe characters: `../../x.py` becomes `x.py`, never a path outside the folder."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .")
    return base[:120] or "document.txt"


def _is_utf8_text(path: Path) -> bool:
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\x00" not in data
