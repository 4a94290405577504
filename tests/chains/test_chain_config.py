"""YAML chains: every shipped config loads, mistakes name the file and key, and `tunesmith chain` runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.chains import ChainConfigError, build_chain, load_chain_config
from tunesmith.chains.config import CONFIG_DIRS, extraction_schema
from tunesmith.cli import main

SHIPPED = sorted(CONFIG_DIRS[1].glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_chain_config(path)
    assert cfg.model == "embedded" and cfg.description


def test_shipped_set_covers_the_pipelines() -> None:
    assert {load_chain_config(p).kind for p in SHIPPED} >= {"rag", "classify", "extract", "summarize"}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "chain.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("kind: classify\nlabels: [a, b]\nlable: x\n", r"chain.yaml: unknown key `lable`. Did you mean `labels`"),
    ("kind: classify\nlabels: [a, b]\nparams: {temprature: 0.1}\n", r"unknown key `params.temprature`"),
    ("kind: rag\ndocs_dir: d\nlabels: [a, b]\n", r"`labels` is not used by kind: rag \(it is for classify\)"),
    ("kind: classify\n", r"kind: classify needs `labels`"),
    ("kind: chat\n", r"`kind` must be one of"),
    ("kind: classify\nlabels: [a, b]\nparams: {max_new_tokens: lots}\n", r"`params.max_new_tokens` must be an integer"),
    ("kind: classify\nlabels: [a, b]\nfallback: c\n", r"`fallback` 'c' is not one of the labels"),
    ("kind: extract\nfields: {name: string}\n", r"fields.name: 'string' is not usable"),
    ("kind: [oops\n", r"chain.yaml line 2: not valid YAML"),
    ("kind: classify\nlabels: [a, b]\nparams: {top_p: 2}\n", r"params: top_p must be in \(0, 1\]"),
])
def test_config_mistakes_name_file_key_and_fix(tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(ChainConfigError, match=message) as e:
        load_chain_config(_write(tmp_path, yaml_text))
    assert "chain.yaml" in str(e.value)


def test_overrides_and_extraction_schema(tmp_path: Path) -> None:
    p = _write(tmp_path, "kind: extract\nfields:\n  name: str\n  age: int?\n  tags: list[str]\n")
    cfg = load_chain_config(p, {"params.temperature": 0.5, "model": "runs/x"})
    assert cfg.params["temperature"] == 0.5 and cfg.model == "runs/x"
    schema = extraction_schema(cfg, str(p))
    assert schema(name="Ada", tags=[]).age is None
    assert set(schema.model_json_schema()["required"]) == {"name", "tags"}


def test_build_chain_from_config_with_a_given_model(scripted) -> None:
    cfg = load_chain_config("classify")
    assert build_chain(cfg, model=scripted(["Category: feature"])).invoke({"text": "add dark mode"}) == "feature"


def test_cli_runs_a_prompt_chain_on_a_run(tiny_run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["chain", "run", "translate", "--model", str(tiny_run_dir), "--set", "params.max_new_tokens=4",
            "--input", "hello", "--var", "language=French"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip()


def test_cli_errors_are_one_line(tiny_run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chain", "run", "translate", "--model", str(tiny_run_dir), "--input", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt `prompt` uses {language}") and "--var language=" in err
    assert main(["chain", "run", "rag_docs", "--model", "runs/no-such-run", "--input", "q"]) == 2
    assert "rag_docs: model: No run or model at runs/no-such-run" in capsys.readouterr().err
    assert main(["chain", "run", "no-such-chain", "--input", "q"]) == 2
    assert "Known chains:" in capsys.readouterr().err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chain", "list"]) == 0
    out = capsys.readouterr().out
    assert "rag_docs" in out and "classify" in out
