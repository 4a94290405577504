"""Retrieval QA: real MiniLM embeddings and a real FAISS index on examples/docs; a scripted model for the answer."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tunesmith.chains import DocumentsError, FaissStore, PromptVariableError, build_index, load_documents, rag_chain
from tunesmith.chains.rag import split_documents


def test_embeddings_are_unit_vectors_that_rank_by_meaning(minilm) -> None:
    q = np.array(minilm.embed_query("How do I continue an interrupted training run?"))
    docs = np.array(minilm.embed_documents(["Resume training from the last checkpoint.", "Paris is in France."]))
    assert q.shape == (384,) and np.allclose(np.linalg.norm(docs, axis=1), 1, atol=1e-5)
    assert docs[0] @ q > docs[1] @ q


def test_documents_are_chunked_with_their_source(docs_dir: Path) -> None:
    docs = load_documents(docs_dir)
    assert {d.metadata["source"] for d in docs} == {p.name for p in docs_dir.iterdir() if p.suffix in (".md", ".txt")}
    assert {"training.md", "models.md", "evaluation.md", "faq.txt"} <= {d.metadata["source"] for d in docs}
    chunks = split_documents(docs, chunk_size=200, chunk_overlap=20)
    assert len(chunks) > len(docs) and all(len(c.page_content) <= 200 for c in chunks)
    assert {c.metadata["source"] for c in chunks} == {d.metadata["source"] for d in docs}


def test_index_is_saved_reloaded_and_rebuilt_when_a_file_changes(docs_dir: Path, tmp_path: Path, minilm) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(docs_dir, docs)
    index = tmp_path / "index"
    first = build_index(docs, index, minilm)
    assert (index / "index.faiss").exists() and (index / "manifest.json").exists()

    start = time.monotonic()
    again = build_index(docs, index, minilm)
    assert time.monotonic() - start < 1.0
    assert [d.page_content for d in again.docs] == [d.page_content for d in first.docs]
    loaded = FaissStore.load_local(index, minilm)
    assert loaded.similarity_search("Which license?", k=1)[0].metadata["source"] == "faq.txt"

    (docs / "new.txt").write_text("The mascot of tunesmith is a purple walrus called Wally.")
    rebuilt = build_index(docs, index, minilm)
    assert rebuilt.similarity_search("What is the mascot?", k=1)[0].metadata["source"] == "new.txt"


def test_rag_chain_returns_answer_and_sources(docs_dir: Path, tmp_path: Path, scripted, minilm) -> None:
    model = scripted(["Use --resume [training.md]"])
    qa = rag_chain(docs_dir, model, k=2, index_dir=tmp_path / "idx", embeddings=minilm)
    out = qa.invoke("How do I resume an interrupted training run?")
    assert out["answer"] == "Use --resume [training.md]"
    assert out["sources"][0].metadata["source"] == "training.md"
    assert len(out["sources"]) == 2 and out["sources"][0].metadata["score"] >= out["sources"][1].metadata["score"]
    system = model.seen[0][0].content
    assert "[training.md]" in system and "--resume" in system  # the retrieved passage, labelled, reaches the model


def test_rag_custom_prompt_needs_context_and_its_variables(docs_dir: Path, tmp_path: Path, scripted, minilm) -> None:
    with pytest.raises(PromptVariableError, match=r"\{context\}"):
        rag_chain(docs_dir, scripted(["x"]), prompt="Answer: {question}", index_dir=tmp_path / "i", embeddings=minilm)
    qa = rag_chain(docs_dir, scripted(["x"]), prompt="Answer in {style} style.\n{context}", index_dir=tmp_path / "i",
                   embeddings=minilm)
    with pytest.raises(PromptVariableError, match=r"\{style\}"):
        qa.invoke("Which license?")
    assert qa.invoke({"question": "Which license?", "style": "terse"})["answer"] == "x"


def test_empty_or_missing_document_folder_is_a_clear_error(tmp_path: Path, scripted) -> None:
    with pytest.raises(DocumentsError, match="it is empty"):
        rag_chain(tmp_path, scripted(["x"]))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DocumentsError, match=r"no documents to index.*image.png"):
        load_documents(tmp_path)
    with pytest.raises(DocumentsError, match="document folder not found"):
        load_documents(tmp_path / "nope")


def test_rag_accepts_a_generator_as_the_ui_calls_it(docs_dir: Path, tmp_path: Path, tiny_gen, minilm) -> None:
    """ui/documents.py calls `rag_chain(folder, generator, params).invoke(question)`."""
    from tunesmith.finetune.generate import GenerationParams

    out = rag_chain(docs_dir, tiny_gen, GenerationParams(max_new_tokens=4, temperature=0), index_dir=tmp_path / "i",
                    embeddings=minilm).invoke("Which license does tunesmith use?")
    assert isinstance(out["answer"], str) and out["sources"][0].metadata["source"] == "faq.txt"


@pytest.mark.slow
def test_embedded_model_answers_from_the_documents_and_cites_the_source(docs_dir: Path, tmp_path: Path) -> None:
    from tunesmith.chains import load_chat_model

    qa = rag_chain(docs_dir, load_chat_model("embedded", max_tokens=40), k=1, index_dir=tmp_path / "idx")
    out = qa.invoke("Which license does tunesmith use?")
    assert [d.metadata["source"] for d in out["sources"]] == ["faq.txt"]
    assert "apache" in out["answer"].lower()
