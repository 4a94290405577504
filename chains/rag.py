"""Retrieval QA over a folder of text documents: chunk, embed (MiniLM, offline), index (FAISS, on disk), answer.

The index is saved next to a manifest of the files it was built from (name, size, mtime) and the chunking
settings; the next run loads it in milliseconds, and rebuilds only when a document or a setting changed.

On a model loaded by tunesmith the answer is extractive: the sentence of the retrieved passages under which the
question is most likely (the model scores "which question does this sentence answer?" for every sentence, as UPR,
Sachan et al. 2022, re-ranks passages), followed by its file in brackets. A 135M model asked to write an answer
invents commands; asked to rank sentences it quotes the one that says `--resume`. Other chat models, or
`extractive=False`, generate an answer from the passages with the RAG prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from operator import itemgetter
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_text_splitters import MarkdownTextSplitter, RecursiveCharacterTextSplitter

from tunesmith.finetune import GenerationParams, Generator, cache_dir

from .chat_model import TunedChatModel, as_chat_model
from .embeddings import default_embeddings
from .errors import ChainConfigError, DocumentsError, PromptVariableError
from .prompts import RAG_QUESTION, RAG_SYSTEM, strict_prompt, text_input
from .store import FaissStore

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
"""What `load_documents` reads by default; pass `suffixes=` for others (e.g. ".py", ".csv": read as plain text)."""


def rag_chain(docs_dir: str | os.PathLike[str], model: BaseChatModel | Generator | str,
              params: GenerationParams | None = None, *, k: int = 2, prompt: str | None = None,
              index_dir: str | os.PathLike[str] | None = None, embeddings: Embeddings | None = None,
              chunk_size: int = 600, chunk_overlap: int = 80, suffixes: tuple[str, ...] = TEXT_SUFFIXES,
              extractive: bool = True) -> Runnable[str | dict[str, Any], dict[str, Any]]:
    """A question (or `{"question": ..., **other prompt variables}`) -> `{"question", "answer", "sources"}`.

    `sources` are the retrieved chunks as LangChain `Document`s, `metadata["source"]` being the file's path
    relative to `docs_dir`. With `extractive` and a tunesmith model the answer is the best passage sentence and
    its `[file]` (module docstring); otherwise it is generated, and `prompt` replaces the system prompt for that
    (it must contain `{context}`). The chunk defaults are small because the default model (135M) answers best
    from short context.
    """
    chat = as_chat_model(model, params)
    store = build_index(docs_dir, index_dir, embeddings, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                        suffixes=suffixes)
    template = ChatPromptTemplate.from_messages([("system", prompt or RAG_SYSTEM), ("human", "{question}")])
    if "context" not in template.input_variables:
        raise PromptVariableError("the RAG prompt must contain {context} (where the retrieved passages go); "
                                  f"got: {prompt!r}")
    retriever = store.as_retriever(search_kwargs={"k": k})
    if extractive and isinstance(chat, TunedChatModel):
        if prompt is not None:  # it would be silently unused: extractive answers are scored, not prompted
            raise ChainConfigError("rag: `prompt` is for generated answers, and this chain quotes the best sentence "
                                   "(extractive). Set extractive: false (extractive=False) to use the prompt, or "
                                   "remove it.")
        answer: Runnable[dict[str, Any], str] = RunnableLambda(lambda x: best_sentence(chat, x["question"],
                                                                                      x["sources"]),
                                                               name="best_sentence")
    else:
        answer = (
            RunnablePassthrough.assign(context=lambda x: format_docs(x["sources"]))
            | strict_prompt(template, "rag")
            | chat
            | StrOutputParser()
        )
    return (
        text_input("question")
        | RunnablePassthrough.assign(sources=itemgetter("question") | retriever)
        | RunnablePassthrough.assign(answer=answer)
        | RunnableLambda(lambda x: {"question": x["question"], "answer": x["answer"].strip(), "sources": x["sources"]},
                         name="answer_with_sources")
    )


def best_sentence(model: TunedChatModel, question: str, docs: list[Document]) -> str:
    """The sentence of `docs` under which `model` finds `question` most likely, then ` [its file]`.

    Scoring P(question | sentence), not P(sentence | question and passages): asked the forward way, the 135M
    model preferred long generic sentences (14 of 35 right on examples/chains/rag_docs_eval.jsonl, against 28)."""
    candidates = [(s, str(d.metadata.get("source", "?"))) for d in docs for s in split_sentences(d.page_content)]
    if not candidates:
        return "The documents found for this question contain no sentence to answer it with."
    prompts = [[{"role": "user", "content": RAG_QUESTION.format(sentence=s)}] for s, _ in candidates]
    scores = [row[0] for row in model._gen().score(prompts, [question.strip()], use_adapter=model.use_adapter)]
    sentence, source = candidates[max(range(len(candidates)), key=scores.__getitem__)]
    return f"{sentence} [{source}]"


def split_sentences(text: str) -> list[str]:
    """The answerable sentences of a passage: paragraphs joined across line breaks, Markdown headings dropped,
    split after . ! ? before a capital or a code span; questions and fragments of < 3 words are left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(line.strip() for line in block.splitlines() if not line.lstrip().startswith("#")).strip()
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z`\"(~])", para):
            sentence = sentence.strip()
            if len(sentence.split()) >= 3 and not sentence.endswith("?"):
                out.append(sentence)
    return out


def format_docs(docs: list[Document]) -> str:
    """Each passage labelled with its file, so the model can name the source it used."""
    return "\n\n".join(f"[{d.metadata.get('source', '?')}]\n{d.page_content}" for d in docs)


def load_documents(docs_dir: str | os.PathLike[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Document]:
    """Every text file under `docs_dir` (hidden folders skipped), one Document per file."""
    root = Path(docs_dir).expanduser()
    if not root.is_dir():
        raise DocumentsError(f"document folder not found: {root}. Point docs_dir at a folder of {'/'.join(suffixes)} "
                             "files (e.g. examples/docs).")
    docs, skipped = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix.lower() not in suffixes or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append(str(rel))
            continue
        if text.strip():
            docs.append(Document(page_content=text, metadata={"source": rel.as_posix()}))
    if skipped:
        log.warning("skipped %d file(s) that are not UTF-8 text: %s", len(skipped), ", ".join(skipped))
    if not docs:
        found = sorted(p.name for p in root.iterdir())[:8]
        raise DocumentsError(
            f"no documents to index in {root}: it holds no non-empty UTF-8 {'/'.join(suffixes)} files"
            f"{' (it has: ' + ', '.join(found) + ')' if found else ' (it is empty)'}. Add some text files, "
            "or pass suffixes=(...) for other text formats."
        )
    return docs


def split_documents(docs: list[Document], chunk_size: int = 600, chunk_overlap: int = 80) -> list[Document]:
    """Markdown is cut at headings first, other text at paragraphs; each chunk keeps its file and a number."""
    md = MarkdownTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    plain = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    chunks = []
    for doc in docs:
        splitter = md if doc.metadata["source"].endswith((".md", ".markdown")) else plain
        for i, piece in enumerate(splitter.split_text(doc.page_content)):
            chunks.append(Document(page_content=piece, metadata={**doc.metadata, "chunk": i}))
    return chunks


def build_index(docs_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None,
                embeddings: Embeddings | None = None, *, chunk_size: int = 600, chunk_overlap: int = 80,
                suffixes: tuple[str, ...] = TEXT_SUFFIXES, rebuild: bool = False) -> FaissStore:
    """Load the saved index for `docs_dir` if it is up to date, else chunk + embed + save it.

    `index_dir` defaults to a folder under the tunesmith cache (never inside the documents folder).
    """
    docs = load_documents(docs_dir, suffixes)
    emb = embeddings or default_embeddings()
    out = Path(index_dir) if index_dir else default_index_dir(docs_dir)
    manifest = {
        "files": [[d.metadata["source"], *_stat(Path(docs_dir) / d.metadata["source"])] for d in docs],
        "chunk_size": chunk_size, "chunk_overlap": chunk_overlap, "embeddings": getattr(emb, "name", type(emb).__name__),
    }
    saved = out / "manifest.json"
    if not rebuild and saved.exists() and json.loads(saved.read_text()) == manifest:
        return FaissStore.load_local(out, emb)
    chunks = split_documents(docs, chunk_size, chunk_overlap)
    log.info("indexing %d chunks from %d files into %s", len(chunks), len(docs), out)
    store = FaissStore.from_texts([c.page_content for c in chunks], emb, [c.metadata for c in chunks])
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # write aside, then swap: never a half index on disk
    store.save_local(tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return store


def default_index_dir(docs_dir: str | os.PathLike[str]) -> Path:
    root = Path(docs_dir).expanduser().resolve()
    return cache_dir() / "rag" / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
