"""A small FAISS vector store: exact inner-product search, saved to and loaded from a folder.

Written on `faiss` directly instead of langchain-community's FAISS, which would pull in that whole package.
It is a LangChain `VectorStore`, so `.as_retriever()` and the usual LCEL wiring work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

_INDEX_FILE, _DOCS_FILE = "index.faiss", "docs.jsonl"


class FaissStore(VectorStore):
    """Documents + a flat inner-product index (cosine similarity for unit vectors such as MiniLM's)."""

    def __init__(self, embeddings: Embeddings, index: Any = None, docs: list[Document] | None = None) -> None:
        self._embeddings = embeddings
        self.index = index
        self.docs: list[Document] = docs or []

    @property
    def embeddings(self) -> Embeddings:
        return self._embeddings

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, **kwargs: Any) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        vecs = np.asarray(self._embeddings.embed_documents(texts), dtype="float32")
        if self.index is None:
            self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)
        start = len(self.docs)
        metas = metadatas or [{} for _ in texts]
        self.docs += [Document(page_content=t, metadata=dict(m)) for t, m in zip(texts, metas)]
        return [str(i) for i in range(start, len(self.docs))]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        if self.index is None or not self.docs:
            return []
        q = np.asarray([self._embeddings.embed_query(query)], dtype="float32")
        scores, ids = self.index.search(q, min(k, len(self.docs)))
        return [(self.docs[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """Copies of the documents, each with its similarity in `metadata["score"]` (shown next to sources)."""
        return [Document(page_content=d.page_content, metadata={**d.metadata, "score": round(s, 4)})
                for d, s in self.similarity_search_with_score(query, k)]

    def _select_relevance_score_fn(self) -> Any:
        return lambda score: score  # cosine similarity is already "higher is more relevant"

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None,
                   **kwargs: Any) -> FaissStore:
        store = cls(embedding)
        store.add_texts(texts, metadatas)
        return store

    def save_local(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / _INDEX_FILE))
        with open(folder / _DOCS_FILE, "w", encoding="utf-8") as f:
            for d in self.docs:
                f.write(json.dumps({"text": d.page_content, "metadata": d.metadata}, ensure_ascii=False) + "\n")

    @classmethod
    def load_local(cls, folder: str | Path, embeddings: Embeddings) -> FaissStore:
        folder = Path(folder)
        index = faiss.read_index(str(folder / _INDEX_FILE))
        lines = (folder / _DOCS_FILE).read_text(encoding="utf-8").splitlines()
        docs = [Document(page_content=r["text"], metadata=r["metadata"]) for r in map(json.loads, lines)]
        if index.ntotal != len(docs):
            raise ValueError(f"{folder}: index has {index.ntotal} vectors but {len(docs)} documents; delete the folder")
        return cls(embeddings, index, docs)
