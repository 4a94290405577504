"""Shipped configs by name or relative path, from any folder; the user's own files win over the shipped ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.chains.config import find_chain_config, load_chain_config
from tunesmith.finetune.config import ConfigError, load_config
from tunesmith.resources import find_config, resolve_path, shipped_path, shipped_root

ROOT = Path(__file__).parents[2]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder outside the checkout, as a user who installed the wheel has."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_checkout_is_the_shipped_root_of_an_editable_install():
    assert shipped_root() == ROOT
    assert shipped_path("examples/data/train.jsonl") == ROOT / "examples/data/train.jsonl"
    # only configs/ and examples/ ship: nothing else of the package is reachable as data
    for path in ("tunesmith/cli.py", "pyproject.toml", "configs/../pyproject.toml", "/etc/passwd", "configs/nope.yaml"):
        assert shipped_path(path) is None, path


def test_training_config_by_name_or_relative_path_from_any_folder(elsewhere: Path):
    by_name = load_config("quickstart", ["train.max_steps=2"])
    by_path = load_config("configs/quickstart.yaml", ["train.max_steps=2"])
    assert by_name == by_path
    assert by_name.output_dir == "runs/quickstart"  # relative: written under the current folder
    assert by_name.data.train == [str(ROOT / "examples/data/train.jsonl")]
    assert Path(by_name.data.train[0]).is_file()
    assert load_config("smollm2-135m_lora.yaml").data.validation == [str(ROOT / "examples/data/test.jsonl")]
    with pytest.raises(ConfigError, match=r"config file not found: quikstart\. .*quickstart"):
        load_config("quikstart")


def test_the_users_own_files_win(elsewhere: Path):
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "quickstart.yaml").write_text("output_dir: runs/mine\ndata:\n  train: [examples/data/train.jsonl]\n")
    (elsewhere / "examples" / "data").mkdir(parents=True)
    (elsewhere / "examples" / "data" / "train.jsonl").write_text('{"text": "mine"}\n')
    cfg = load_config("quickstart")
    assert cfg.output_dir == "runs/mine"
    assert cfg.data.train == ["examples/data/train.jsonl"]  # the user's file, still relative to the current folder
    assert find_config("configs/quickstart.yaml") == Path("configs/quickstart.yaml")
    assert resolve_path("examples/docs") == str(ROOT / "examples/docs")  # not in the user's folder: the shipped one
    assert resolve_path("data/missing.jsonl") == "data/missing.jsonl"  # unchanged, for the loader's not-found error


def test_chain_configs_and_their_documents_from_any_folder(elsewhere: Path):
    assert find_chain_config("classify") == ROOT / "configs/chains/classify.yaml"
    assert find_chain_config("configs/chains/rag_docs.yaml") == ROOT / "configs/chains/rag_docs.yaml"
    assert resolve_path(load_chain_config("rag_docs").docs_dir or "") == str(ROOT / "examples/docs")
    (elsewhere / "configs" / "chains").mkdir(parents=True)
    (elsewhere / "configs" / "chains" / "classify.yaml").write_text("kind: classify\nlabels: [a, b]\n")
    assert load_chain_config("classify").labels == ["a", "b"]
