"""The real entry points: `tunesmith` commands on the tiny model and one slow
end-to-end run with the embedded SmolLM2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DATA = str(ROOT / "tests" / "fixtures" / "messages.jsonl")
BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def _train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"base_model={model}", f"output_dir={out}", f"data.train=[{DATA}]", "data.val_set_size=0",
            "train.max_steps=4", "train.micro_batch_size=1", "train.precision=fp32", "train.save_every=0", *extra]


def test_cli_train_chat_eval_merge_preview(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = _run([str(BIN / "tunesmith"), "train", str(ROOT / "configs" / "quickstart.yaml"),
              *_train_args(tiny_model_dir, out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    r = _run([str(BIN / "tunesmith"), "chat", str(out), "--prompt", "hello", "--max-new-tokens", "5"])
    assert r.returncode == 0 and "> hello" in r.stdout, r.stderr[-2000:]
    r = _run([str(BIN / "tunesmith"), "eval", str(out), "--data", DATA, "--max-new-tokens", "4"])
    assert r.returncode == 0 and "exact_match" in r.stdout and "base" in r.stdout, r.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text())["records"] == 2
    r = _run([str(BIN / "tunesmith"), "merge", str(out)])
    assert r.returncode == 0 and (out / "merged" / "model.safetensors").exists(), r.stderr[-2000:]
    r = _run([str(BIN / "tunesmith"), "data", "preview", DATA, "--base-model", str(tiny_model_dir), "-n", "1"])
    assert r.returncode == 0 and "«Paris.<|im_end|>»" in r.stdout, r.stderr[-2000:]


def test_cli_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  learning_rate: 1\n")
    r = _run([str(BIN / "tunesmith"), "train", str(bad)])
    assert r.returncode == 2
    assert "unknown key `train.learning_rate`. Did you mean `train.lr`" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    """The real SmolLM2-135M-Instruct: a few LoRA steps on the shipped data, then generate with the tuned run."""
    out = tmp_path / "smol"
    r = _run([str(BIN / "tunesmith"), "train", str(ROOT / "configs" / "quickstart.yaml"), f"output_dir={out}",
              "train.max_steps=3", "train.micro_batch_size=2", "train.eval_every=0", "train.save_every=0",
              "data.val_set_size=4"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] < 15
    from tunesmith.finetune.generate import GenerationParams, load_generator

    gen = load_generator(out)
    c = gen.generate([{"role": "user", "content": "What is the capital of France?"}],
                     GenerationParams(max_new_tokens=20, temperature=0))
    assert c.text.strip() and c.completion_tokens > 0
    assert "Paris" in c.text  # the instruct model still knows; 3 LoRA steps must not break it


def test_cli_parsing_and_public_names_do_not_import_torch():
    """`tunesmith --help` answered in ~5 s when the packages imported torch eagerly; names now load on first use."""
    code = ("import sys; from tunesmith.cli import build_parser; build_parser().format_help(); "
            "import tunesmith.finetune as f, tunesmith.chains as c; f.ConfigError; c.ChainError; "
            "print(sorted(m for m in ('torch', 'transformers', 'langchain_core') if m in sys.modules))")
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    # a submodule import must not shadow a same-named function (`train` lives in trainer.py for that reason)
    code = ("import tunesmith.finetune.trainer, tunesmith.finetune.generate; import tunesmith.finetune as f; "
            "from tunesmith.finetune import train; print(train.__module__, f.load_generator.__module__)")
    r = _run([sys.executable, "-c", code])
    assert r.stdout.split() == ["tunesmith.finetune.trainer", "tunesmith.finetune.generate"], r.stderr[-2000:]


def test_overrides_may_follow_options():
    """The README writes `tunesmith sweep CFG --trials 8 train.lr=1e-4`; argparse alone refused the override there."""
    from tunesmith.cli import parse_args

    a = parse_args(["sweep", "c.yaml", "data.max_length=64", "--trials", "2", "train.lr=1e-4", "--seed", "3"])
    assert (a.config, a.trials, a.seed, a.overrides) == ("c.yaml", 2, 3, ["data.max_length=64", "train.lr=1e-4"])
    assert parse_args(["train", "c.yaml", "--dry-run", "train.lr=1e-4"]).overrides == ["train.lr=1e-4"]
    with pytest.raises(SystemExit):
        parse_args(["sweep", "c.yaml", "--trials", "2", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(["eval", "RUN", "--data", "t.jsonl", "train.lr=1e-4"])  # eval takes no overrides
