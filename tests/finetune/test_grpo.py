"""GRPO through the real training loop on the tiny model: a reward that prefers one token teaches the policy to
emit it, a resumed run samples and trains exactly as an uninterrupted one, the KL penalty and per-function reward
metrics are logged, and FSDP is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_methods import assert_same_run

from tunesmith.finetune.config import ConfigError, load_config
from tunesmith.finetune.trainer import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[2]
PROMPT = [{"role": "user", "content": "Say a word."}]


def _cfg(model_dir: Path, out: Path, data: Path, *extra: str):
    return load_config(None, [
        f"base_model={model_dir}", f"output_dir={out}", f"data.train=[{data}]", "data.val_set_size=0",
        "data.max_length=64", "train.precision=fp32", "train.lr=5e-3", "train.max_steps=2", "train.micro_batch_size=1",
        "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "lora.r=8", "lora.alpha=16",
        "train.scheduler=constant", "seed=0", "method=grpo", "grpo.num_generations=4", "grpo.max_new_tokens=4",
        "grpo.rewards=[{name: exact_match, field: answer}, {name: regex, pattern: '[aeiou]'}]", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_to_emit_the_rewarded_token(tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """One-token answers sampled from the top of the distribution (top_p), a `module:function` reward that pays
    1 for one of them: after a few steps that token is much likelier, also among the tokens the sampler picks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.finetune.pairs import completion_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = tok(tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]

    def first_token_probs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float(), -1)

    p0 = first_token_probs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    top = p0.topk(5).indices.tolist()  # the nucleus of top_p = their mass: what the sampler can pick

    def round_trips(t: int) -> bool:  # the answer's text tokenizes back to the same single token
        ids, train_mask = completion_ids(PROMPT, [{"role": "assistant", "content": tok.decode([t])}], tok,
                                         tok.chat_template)
        return ids[train_mask.index(True)] == t and tok.decode([t]).strip() == tok.decode([t]) != ""

    target = next(t for t in top if t not in tok.all_special_ids and round_trips(t))
    (tmp_path / "toy_reward.py").write_text(
        f"def pick(prompts, completions, **fields):\n    return [float(c == {tok.decode([target])!r}) "
        "for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    top_p = float(p0[top].sum()) + 1e-4
    s = setup(_cfg(tiny_model_dir, tmp_path / "r", data, "grpo.rewards=[toy_reward:pick]", "grpo.max_new_tokens=1",
                   "grpo.num_generations=16", f"grpo.top_p={top_p}", "train.max_steps=6"))
    fit(s)
    p1 = first_token_probs(s.model)
    rows = _rows(tmp_path / "r")
    assert p1[target] > 2 * p0[target]
    assert p1[target] / p1[top].sum() > 1.5 * p0[target] / p0[top].sum()
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"] and "reward_mean/toy_reward:pick" in rows[0]
    assert rows[0]["completions"] == 16 and rows[0]["completion_length"] == 1


def test_grpo_resume_is_exact_and_logs_kl_and_rewards(tiny_model_dir: Path, tmp_path: Path) -> None:
    """3 steps straight == 2 steps, stop, resume 1: the same sampled answers (seeded per step), losses, metrics and
    weights, bit for bit; with grpo.beta > 0 the KL to the adapter-off reference is logged."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in (("What is two plus two?", "four"), ("Capital of France?", "Paris"),
                                         ("Say hello.", "Hello"))))
    extra = ("train.max_steps=3", "train.save_every=2", "train.keep_checkpoints=5", "grpo.beta=0.1", f"data.validation=[{data}]",
             "train.eval_every=1")
    full = tmp_path / "full"
    summary = train(_cfg(tiny_model_dir, full, data, *extra))
    rows = [r for r in _rows(full) if "loss" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # step 1: policy == reference
    for key in ("reward_mean", "reward_mean/exact_match(field=answer)", "reward_mean/regex(pattern=[aeiou])",
                "reward_std/regex(pattern=[aeiou])", "reward_std", "clip_ratio", "completion_length"):
        assert key in rows[-1], key
    assert "eval_reward_mean" in rows[0] and "eval_reward_mean" in summary
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())  # rows past the checkpoint are dropped
    fit(setup(_cfg(tiny_model_dir, part, data, *extra), resume=True), resume=True)
    assert_same_run(full, part)
    from tunesmith.finetune.evaluate import evaluate_run, format_table

    res = evaluate_run(full, data, max_new_tokens=4, progress=False)  # `tunesmith eval` on prompt-only records
    assert set(res["models"]) == {"tuned", "base"} and "reward_mean/regex(pattern=[aeiou])" in res["models"]["base"]
    assert "reward_mean" in format_table(res) and len(res["predictions"]) == 3


def test_grpo_under_fsdp_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from accelerate.utils import DistributedType

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "answer": "hello"}) + "\n")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="method grpo under FSDP is not supported"):
        setup(_cfg(tiny_model_dir, tmp_path / "r", data), accelerator=fsdp)


def test_grpo_prompt_too_long_names_the_record(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunesmith.finetune.data import DataError

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 60}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: the prompt is \d+ tokens and answers may take 4"):
        setup(_cfg(tiny_model_dir, tmp_path / "r", data))


def test_grpo_shared_prompt_trains_like_whole_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A prompt's samples share one forward of the prompt (data.share_prompt): the same losses, KL and rewards,
    step for step, as each sample forwarded whole (sampling is seeded, so both runs train on the same answers)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in (("What is two plus two?", "four"), ("Capital of France?", "Paris"))))
    rows = {}
    for share in (True, False):
        s = setup(_cfg(tiny_model_dir, tmp_path / str(share), data, "train.max_steps=3", "grpo.beta=0.1",
                       "train.micro_batch_size=2", f"data.share_prompt={share}"))
        assert s.method.share is share
        fit(s)
        rows[share] = [r for r in _rows(tmp_path / str(share)) if "loss" in r]
    for a, b in zip(rows[True], rows[False], strict=True):
        for key in ("loss", "kl", "reward_mean", "completion_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
