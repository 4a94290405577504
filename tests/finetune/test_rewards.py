"""GRPO pieces: built-in rewards, `module:function` loading and its errors, the calling convention, group-normalised
advantages and the clipped objective against hand-computed values, and a toy run on the tiny model where a reward
for one token makes the model write it more."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tunesmith.finetune.config import ConfigError
from tunesmith.finetune.rewards import (
    Reward,
    RewardError,
    exact_match,
    group_advantages,
    grpo_loss,
    k3_kl,
    length_penalty,
    load_reward,
    regex_match,
    reward_metrics,
    score_rewards,
    total_reward,
    valid_json,
)

pytestmark = pytest.mark.usefixtures("one_thread")


P = ["q"] * 4


# -- built-ins ---------------------------------------------------------------------------------------------------
def test_exact_match_normalises_and_extracts() -> None:
    fn = exact_match("answer")
    got = fn(P, ["Paris.", " PARIS ", "4.0", "Lyon"], answer=["paris", "Paris", "4", ["Paris", "Nice"]])
    assert got == [1.0, 1.0, 1.0, 0.0]
    fn = exact_match("answer", pattern=r"Answer:\s*(.+)")
    assert fn(P[:3], ["So... Answer: 1,000", "no answer here", "Answer: 12"], answer=["1000", "x", "13"]) == [
        1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="needs a group"):
        exact_match(pattern="Answer:")


def test_regex_json_and_length() -> None:
    assert regex_match(r"\d+")(P[:2], ["it is 42", "none"]) == [1.0, 0.0]
    assert regex_match(r"\d+", full=True)(P[:2], [" 42 ", "it is 42"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        regex_match("(")
    comps = ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "{'a': 1}", "sure: {}"]
    assert valid_json()(P, comps) == [1.0, 1.0, 0.0, 0.0]
    pen = length_penalty(10, soft=4)
    assert pen(P, ["", "", "", ""], completion_tokens=[6, 8, 10, 11]) == [0.0, -0.5, -1.0, -1.0]
    assert length_penalty(10)(P[:2], ["", ""], completion_tokens=[10, 11]) == [0.0, -1.0]
    with pytest.raises(ConfigError, match="soft <= max_tokens"):
        length_penalty(4, soft=5)


def test_json_schema() -> None:
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install jsonschema"):
            valid_json(schema)
        return
    assert valid_json(schema)(P[:3], ['{"name": "x"}', '{"name": 1}', "[]"]) == [1.0, 0.0, 0.0]


# -- loading and calling -----------------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards_mod.py").write_text(
        "def brevity(prompts, completions, **fields):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def uses_fields(prompts, completions, level, **fields):\n"
        "    return [float(lv) if lv is not None else None for lv in level]\n"
        "def broken(prompts, completions, **fields):\n"
        "    raise KeyError('gold')\n"
        "def short(prompts, completions, **fields):\n"
        "    return [1.0]\n"
        "def bad_value(prompts, completions, **fields):\n"
        "    return [float('nan')] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_load_builtins_and_user_functions(user_module: str) -> None:
    r = load_reward("json")
    assert r.name == "json" and r.weight == 1.0
    r = load_reward({"name": "exact_match", "field": "gold", "weight": 2})
    assert r.name == "exact_match(field=gold)" and r.weight == 2.0
    r = load_reward(f"{user_module}:brevity")
    assert r.fn(["q"], ["abc"]) == [0.25]


@pytest.mark.parametrize("spec, match", [
    ("jsn", r"grpo.rewards\[0\]: unknown reward `jsn`.*built-in \(exact_match, regex, json, length\)"),
    ("no_such_module_xyz:fn", r"cannot import `no_such_module_xyz`.*PYTHONPATH"),
    ("my_rewards_mod:nope", r"`my_rewards_mod` has no function `nope` \(it has: .*brevity"),
    ({"name": "my_rewards_mod:brevity", "scale": 2}, r"got arguments \['scale'\]"),
    ({"name": "regex"}, r"reward `regex`:.*pattern"),
    ({"name": "json", "weight": "high"}, r"`weight` of reward `json` must be a number"),
    (3, r"a reward is a built-in name"),
])
def test_load_errors_name_the_key_and_fix(user_module: str, spec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_reward(spec, where="grpo.rewards[0]")


def test_score_rewards_convention_and_errors(user_module: str) -> None:
    where = [f"d.jsonl:{i}" for i in range(1, 5)]
    fields = {"level": [1, None, 3, 4], "answer": ["a", "b", "c", "d"]}
    rewards = [load_reward(f"{user_module}:uses_fields"), load_reward({"name": "exact_match", "weight": 0.5})]
    scores = score_rewards(rewards, P, ["a", "x", "c", "x"], fields, where)
    assert scores[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert math.isnan(scores[1, 0]) and scores[2, 0] == 3.0
    assert total_reward(scores, rewards).tolist() == [1.5, 0.0, 3.5, 4.0]  # None neither rewards nor punishes
    m = reward_metrics(scores, rewards)
    assert m["reward_mean/my_rewards_mod:uses_fields"] == pytest.approx(8 / 3)
    assert m["reward_mean/exact_match"] == 0.5 and m["reward_mean"] == pytest.approx(9 / 4)
    # std per function, unbiased, over the completions it applied to: [1, 3, 4] and [1, 0, 1, 0]
    assert m["reward_std/my_rewards_mod:uses_fields"] == pytest.approx(math.sqrt(7 / 3))
    assert m["reward_std/exact_match"] == pytest.approx(math.sqrt(1 / 3))
    with pytest.raises(RewardError, match=r"d.jsonl:2: exact_match: the record has no `answer`"):
        score_rewards([load_reward("exact_match")], P, ["a"] * 4, {"answer": ["a", None, "c", "d"]}, where)
    with pytest.raises(RewardError, match=r"reward `my_rewards_mod:broken` raised KeyError.*d.jsonl:1"):
        score_rewards([load_reward(f"{user_module}:broken")], P, ["a"] * 4, {}, where)
    with pytest.raises(RewardError, match=r"must return a list of 4 numbers.*got 1 values"):
        score_rewards([load_reward(f"{user_module}:short")], P, ["a"] * 4, {}, where)
    with pytest.raises(RewardError, match=r"d.jsonl:1: reward `my_rewards_mod:bad_value` returned nan"):
        score_rewards([load_reward(f"{user_module}:bad_value")], P, ["a"] * 4, {}, where)


# -- GRPO objective ----------------------------------------------------------------------------------------------
def test_group_advantages_hand_values() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = group_advantages(r, 4)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased, as TRL's nanstd
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (std + 1e-4))
    assert a[4:].tolist() == [0.0] * 4  # all samples equal: no signal
    assert group_advantages(r, 4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_k3_kl_hand_value() -> None:
    got = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0]))
    torch.testing.assert_close(got, torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0]))


def test_grpo_loss_hand_value() -> None:
    # completion 0: tokens 0, 1; completion 1: token 2
    seq = torch.tensor([0, 0, 1])
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, m = grpo_loss(logp, old, adv, seq, epsilon=0.2)
    e = math.exp(0.5)  # ratio of tokens 0 and 2
    # token 0: A > 0, ratio 1.65 clipped to 1.2; token 1: ratio 1; token 2: A < 0, min picks the unclipped -3.3
    want = ((-1.2 + -1.0) / 2 + (e * 2.0)) / 2
    assert loss.item() == pytest.approx(want)
    assert m["clip_ratio"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0].item() == 0.0  # clipped: no gradient
    assert logp.grad[1].item() == pytest.approx(-1.0 / 2 / 2)
    ref = torch.tensor([-1.0, -2.5, -0.5], dtype=torch.float64)
    with_kl, m = grpo_loss(logp, old, adv, seq, epsilon=0.2, beta=0.1, ref_logp=ref)
    kl1 = math.exp(-0.5) + 0.5 - 1
    assert with_kl.item() == pytest.approx(want + 0.1 * (kl1 / 2) / 2)
    assert m["kl"].item() == pytest.approx(kl1 / 3)
    high, _ = grpo_loss(logp, old, adv, seq, epsilon=0.2, epsilon_high=0.28)  # DAPO's clip-higher
    assert high.item() == pytest.approx(((-1.28 + -1.0) / 2 + e * 2.0) / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, seq, beta=0.1)


def test_grpo_toy_learns_to_emit_the_rewarded_token(tiny_model_dir) -> None:
    """Samples from the run's own Generator, rewards, group advantages, the clipped objective: the token the
    reward prefers gets likelier, also relative to the other tokens the sampler could pick at the start."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.finetune.data import IGNORE
    from tunesmith.finetune.generate import GenerationParams, Generator
    from tunesmith.finetune.model import LoadedRun
    from tunesmith.finetune.pairs import collate_sequences, completion_ids, sampled_examples
    from tunesmith.finetune.preference import token_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = Generator(LoadedRun(model, tok, "tiny", str(tiny_model_dir), None, {}))
    prompt = [{"role": "user", "content": "Say a word."}]
    prompt_ids = tok(gen.render(prompt), add_special_tokens=False)["input_ids"]

    def first_token_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float(), -1)

    p0 = first_token_probs()
    top = p0.topk(5).indices.tolist()  # what top_k=5 sampling can pick at the start
    target = next(t for t in top if tok.decode([t]).strip() == tok.decode([t]) != "" and t not in tok.all_special_ids
                  and (lambda ids, tr: ids[tr.index(True)])(*completion_ids(
                      prompt, [{"role": "assistant", "content": tok.decode([t])}], tok, tok.chat_template)) == t)
    word = tok.decode([target])
    reward = Reward("target", lambda prompts, completions, **kw: [float(c == word) for c in completions])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    n = 16
    for _ in range(6):
        samples = gen.batch([prompt] * n, GenerationParams(max_new_tokens=1, temperature=1.0, top_k=5))
        texts = [s.text for s in samples]
        assert all(s.prompt_ids == prompt_ids and len(s.token_ids) == s.completion_tokens == 1 for s in samples)
        batch = collate_sequences(sampled_examples(samples, 64), tok.pad_token_id, packed=False)
        adv = group_advantages(total_reward(score_rewards([reward], [prompt] * n, texts, {}, ["toy:1"] * n),
                                            [reward]).float(), n)
        logp = token_logps(model, batch)
        loss, _ = grpo_loss(logp, logp.detach(), adv, batch["sequence"][batch["targets"] != IGNORE])
        opt.zero_grad()
        loss.backward()
        opt.step()
    p1 = first_token_probs()
    assert p1[target] > 1.5 * p0[target]
    assert p1[target] / p1[top].sum() > 1.5 * p0[target] / p0[top].sum()


def test_grpo_batch_with_nothing_trained_gives_zero_loss_not_a_crash(tiny_model_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.finetune.data import IGNORE
    from tunesmith.finetune.pairs import collate_sequences, sampled_examples
    from tunesmith.finetune.preference import token_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    prompt = [{"role": "user", "content": "hi"}]
    ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    empty = SimpleNamespace(prompt_ids=ids["input_ids"], token_ids=[])  # answers cut at max_new_tokens=0
    batch = collate_sequences(sampled_examples([empty, empty], 32), tok.pad_token_id, packed=False)
    logp = token_logps(model, batch)
    assert logp.shape == (0,)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), batch["sequence"][batch["targets"] != IGNORE])
    assert loss.item() == 0.0
    loss.backward()  # the step goes on; nothing is learned from it
