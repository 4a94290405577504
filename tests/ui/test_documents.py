"""Chain-mode uploads: only small UTF-8 text files are kept, under a clean name, copied (never linked or run)."""

from __future__ import annotations

from types import SimpleNamespace

from tunesmith.ui.documents import _source_line, list_documents, store_uploads


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
    doc = SimpleNamespace(page_content="Paris is\n the capital.", metadata={"source": "/tmp/x/notes.md"})
    assert _source_line(doc) == "notes.md: Paris is the capital."
    assert _source_line({"source": "a.txt", "text": "hi"}) == "a.txt: hi"
    assert _source_line("plain") == "plain"


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
