"""Chain-mode uploads: only small UTF-8 text files are kept, under a clean name, copied (never linked or run)."""

from __future__ import annotations

from langchain_core.documents import Document

from tunesmith.ui.documents import ALLOWED_SUFFIXES, _source_line, list_documents, store_uploads


def test_uploads_are_filtered_and_copied(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "notes.md").write_text("# Notes\nParis is the capital of France.\n")
    (src / "evil.sh").write_text("rm -rf /\n")
    (src / "big.txt").write_text("x" * 2048)
    (src / "binary.txt").write_bytes(b"\x00\x01\xff")
    dest = tmp_path / "session"
    dest.mkdir()
    files = [str(src / n) for n in ("notes.md", "evil.sh", "big.txt", "binary.txt")]
    report = store_uploads(files, dest, max_bytes=1024)
    assert list_documents(dest) == ["notes.md"]
    assert not (dest / "notes.md").is_symlink()
    assert report[0].startswith("notes.md: indexed")
    assert "only text files" in report[1] and "over the" in report[2] and "not UTF-8" in report[3]


def test_upload_names_cannot_leave_the_folder(tmp_path):
    weird = tmp_path / "..%2F..%2Fescape.txt"
    weird.write_text("hello")
    dest = tmp_path / "session"
    dest.mkdir()
    store_uploads([str(weird)], dest)
    assert [p.parent for p in dest.iterdir()] == [dest]


def test_source_lines():
    doc = Document(page_content="Paris is\n the capital.", metadata={"source": "/tmp/x/notes.md"})
    assert _source_line(doc) == "notes.md: Paris is the capital."


def test_pdf_is_refused_with_a_reason(tmp_path):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 ...")
    dest = tmp_path / "session"
    dest.mkdir()
    report = store_uploads([str(tmp_path / "paper.pdf")], dest)
    assert report == [f"paper.pdf: refused, only text files ({', '.join(ALLOWED_SUFFIXES)}) are indexed"]
    assert list_documents(dest) == []


def test_ask_documents_runs_the_real_chain(tmp_path, tiny_model_dir):
    from tunesmith.finetune.generate import GenerationParams, load_generator
    from tunesmith.ui.documents import ask_documents

    (tmp_path / "in.md").write_text("Paris is the capital of France.\n")
    folder = tmp_path / "session"
    folder.mkdir()
    store_uploads([str(tmp_path / "in.md")], folder)
    res = ask_documents(load_generator(tiny_model_dir), folder, "capital of France?",
                        GenerationParams(max_new_tokens=4, temperature=0))
    assert res.sources == ["in.md: Paris is the capital of France."]
    assert list_documents(folder) == ["in.md"]  # the index sits hidden beside the uploads


def test_written_answers_stream_and_stop_ends_the_generation(tmp_path, tiny_run_dir):
    """Stop on the Documents tab: the token callback raises once cancel is set, and the chain's generation ends
    (a 400-token answer would otherwise run on)."""
    import threading

    from tunesmith.finetune.generate import GenerationParams, load_generator
    from tunesmith.ui.documents import ask_documents
    from tunesmith.ui.streaming import run_with_tokens

    (tmp_path / "in.md").write_text("Paris is the capital of France.\n")
    folder = tmp_path / "session"
    folder.mkdir()
    store_uploads([str(tmp_path / "in.md")], folder)
    gen = load_generator(tiny_run_dir)
    params = GenerationParams(max_new_tokens=400, temperature=0, repetition_penalty=1.0)
    cancel = threading.Event()
    kinds = []
    for kind, _ in run_with_tokens(lambda on_token: ask_documents(gen, folder, "capital?", params, extractive=False,
                                                                  on_token=on_token), cancel):
        kinds.append(kind)
        if kinds.count("token") == 3:
            cancel.set()
    assert kinds[:3] == ["token"] * 3 and kinds[-1] == "cancelled" and len(kinds) <= 6
