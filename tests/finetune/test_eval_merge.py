"""eval (base vs tuned) and merge (logits checked) on a tiny run; run loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.finetune.evaluate import evaluate_run, format_table
from tunesmith.finetune.merge import merge_run
from tunesmith.finetune.metrics import rouge_l
from tunesmith.finetune.model import ModelLoadError, load_run

DATA = "tests/fixtures/messages.jsonl"


def test_rouge_is_the_standard_one():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert rouge_l(["cat"], ["dog"]) == 0.0
    # rouge-score's ROUGE-L F1 with stemming: LCS "cat sat on the mat" (5 of 6 and 5 of 6 tokens, "mats" -> "mat")
    assert rouge_l(["a cat sat on the mats"], ["the cat sat on the mat"]) == pytest.approx(0.8333, abs=1e-4)


def test_eval_reports_base_and_tuned(tiny_run_dir):
    res = evaluate_run(tiny_run_dir, DATA, max_new_tokens=8)
    assert set(res["models"]) == {"tuned", "base"}
    assert res["models"]["tuned"]["loss"] != res["models"]["base"]["loss"]
    for m in res["models"].values():
        assert m["perplexity"] == pytest.approx(torch.tensor(m["loss"]).exp().item(), rel=1e-3)
        assert 0 <= m["exact_match"] <= 1 and 0 <= m["rouge_l"] <= 1
    table = format_table(res)
    assert "exact_match" in table and "tuned" in table and "base" in table


def test_merge_matches_adapter_and_loads_without_peft(tiny_run_dir, tmp_path):
    res = merge_run(tiny_run_dir, tmp_path / "merged")
    assert res["max_abs_logit_diff"] < 1e-3
    merged = load_run(tmp_path / "merged", dtype=torch.float32, device="cpu")
    tuned = load_run(tiny_run_dir, dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, tuned.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert not hasattr(merged.model, "peft_config")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_load_errors_are_clear(tmp_path, tiny_run_dir):
    with pytest.raises(ModelLoadError, match="No run or model at"):
        load_run(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("base_model: x\n")
    with pytest.raises(ModelLoadError, match="no finished adapter.*--resume"):
        load_run(half)


def test_adapter_on_wrong_base_is_refused(tiny_model_dir, tmp_path):
    from tunesmith.finetune.config import load_config
    from tunesmith.finetune.tiny import build_tiny_model
    from tunesmith.finetune.trainer import train

    out = tmp_path / "r"
    train(load_config(None, [f"base_model={tiny_model_dir}", f"output_dir={out}", f"data.train=[{DATA}]",
                             "data.val_set_size=0", "train.max_steps=1", "train.precision=fp32"]))
    other = build_tiny_model(tmp_path / "other", hidden_size=32)
    cfg = (out / "config.yaml").read_text().replace(str(tiny_model_dir), str(other))
    (out / "config.yaml").write_text(cfg)
    with pytest.raises(ModelLoadError, match="trained on a different base model"):
        load_run(out)
