"""The committed Debian-sections set is what its builder promises: balanced, nested, disjoint, one record format;
the builder's filters on a hand-written index; and a rebuild from apt's index gives the committed bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DATA = ROOT / "benchmarks" / "data" / "debian_sections"
_spec = importlib.util.spec_from_file_location("build_debian_sections", DATA.parent / "build_debian_sections.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up while the class is built
_spec.loader.exec_module(build)


def _load(name: str) -> list[tuple[str, str]]:
    """(user content, label) per record, checking the chat shape on the way."""
    rows = []
    for line in (DATA / name).read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        rows.append((msgs[0]["content"], msgs[1]["content"]))
    return rows


def test_committed_files_are_balanced_nested_and_disjoint():
    manifest = json.loads((DATA / "manifest.json").read_text())
    labels = tuple(manifest["labels"])
    assert labels == build.SECTIONS
    test = _load("test.jsonl")
    assert Counter(y for _, y in test) == {lab: build.N_TEST for lab in labels}
    pools = {n: _load(f"train_{n}.jsonl") for n in build.TRAIN_SIZES}
    for n, rows in pools.items():
        assert Counter(y for _, y in rows) == {lab: n for lab in labels}
        assert manifest["records"][f"train_{n}"] == len(rows)
    texts = {n: {x for x, _ in rows} for n, rows in pools.items()}
    assert texts[20] <= texts[50] <= texts[150]
    assert not texts[150] & {x for x, _ in test}
    question = build.QUESTION.format(labels=", ".join(labels))
    assert all(x.startswith(question + "\n\n") for x, _ in test + pools[150])
    assert len({x for x, _ in test}) == len(test)
    val = _load("val.jsonl")
    assert Counter(y for _, y in val) == {lab: build.N_VAL for lab in labels}
    assert {x for x, _ in val} <= texts[150] and not {x for x, _ in val} & texts[50]


_INDEX = """\
Package: foo
Section: games
Description: a maze game with monsters

Package: foo-data
Source: foo
Section: games
Description: data files for foo

Package: foo-extra
Source: foo (1.0-1)
Section: games
Description: more mazes for foo

Package: bar
Section: sound
Description: transitional package for baz

Package: hunspell-xx
Section: mail
Description: Xish dictionary for mail clients

Package: hunspell-yy
Section: mail
Description: Yish dictionary for mail clients

Package: qux-dev
Section: sound
Description: development files for qux

Package: libqux1
Section: libs
Description: qux shared library
"""


def test_candidates_keep_one_program_per_source_and_drop_near_copies():
    pkgs = build.candidates(build.parse_stanzas(_INDEX), ("games", "mail", "sound"))
    # foo-data (support package), bar (transitional), qux-dev (-dev), libqux1 (section libs) are gone;
    # foo and foo-extra share a source: the one named like it stays
    assert [p.name for p in pkgs] == ["foo", "hunspell-xx", "hunspell-yy"]
    assert [p.name for p in build.drop_near_duplicates(pkgs)] == ["foo", "hunspell-xx"]


def test_split_refuses_a_section_too_small_by_name():
    pkgs = [build.Package(f"p{i}", f"p{i}", "games", f"game {i}") for i in range(10)]
    with pytest.raises(SystemExit, match="section 'games' has 10 usable packages"):
        build.split(pkgs)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found.*--packages"):
        build.read_index(tmp_path / "Packages.lz4")


def test_rebuild_from_the_same_index_gives_the_committed_files(tmp_path):
    manifest = json.loads((DATA / "manifest.json").read_text())
    if not build.PACKAGES.is_file():
        pytest.skip(f"{build.PACKAGES} not on this machine")
    import importlib.util
    import shutil

    if importlib.util.find_spec("lz4") is None and shutil.which("lz4") is None:
        pytest.skip("no lz4 decompressor (pip install lz4) to read apt's index")
    text = build.read_index(build.PACKAGES)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != manifest["index_sha256"]:
        pytest.skip("apt's index changed since the set was built (apt-get update): a rebuild would differ")
    build.main(["--out", str(tmp_path)])
    for f in DATA.glob("*.json*"):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
