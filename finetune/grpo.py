"""GRPO's micro-batch: sample answers with the run's own `Generator`, score them, group advantages, tokenize.

The loss itself (token log-probs, the clipped surrogate, the optional KL to the adapter-off reference) is computed
in `methods.PreferenceModel.forward`, inside DDP like every other method. Sampling is seeded per (seed, step,
rank, micro-batch), so a resumed run samples the same answers as an uninterrupted one; each prompt's group of
`num_generations` answers is sampled, scored and normalised on one rank.
"""

from __future__ import annotations

from typing import Any

import torch

from .methods import Micro
from .pairs import PromptRecord, Unpaired, collate_sequences, sampled_examples, tokenize_unpaired
from .rewards import group_advantages, reward_metrics, score_rewards, total_reward


def make_generator(s: Any) -> Any:
    """The run's own Generator over the model being trained (the same weights, no copy)."""
    from .generate import Generator
    from .model import LoadedRun

    return Generator(LoadedRun(s.model, s.tokenizer, s.cfg.output_dir, s.cfg.base_model, None, {}), own_threads=False)


def step_seed(seed: int, step: int, rank: int, j: int) -> int:
    """A sampling seed per (run seed, step, rank, micro-batch): the same answers after a resume."""
    return ((((seed * 1_000_003) + step) * 1_009 + rank) * 101 + j) % 2**62


def sample(s: Any, prompts: list[Any], seed: int, temperature: float) -> list[Any]:
    """Answers from the policy as it is now: eval mode (no dropout; gradient checkpointing is off outside
    training), every row its own generator drawn from `seed`, torch's global RNG left as it was."""
    from .generate import GenerationParams

    g = s.cfg.grpo
    params = GenerationParams(max_new_tokens=g.max_new_tokens, temperature=temperature, top_p=g.top_p, top_k=0,
                              repetition_penalty=1.0)
    was = s.loss_model.training
    s.loss_model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # RowSampler seeds each row's generator from the global RNG: distinct samples
            return s.method.generator.batch(prompts, params, max_batch_size=len(prompts))
    finally:
        s.loss_model.train(was)


def _fields(items: list[PromptRecord], repeat: int) -> dict[str, list[Any]]:
    keys = sorted({k for it in items for k in it.fields})
    return {k: [it.fields.get(k) for it in items for _ in range(repeat)] for k in keys}


def prepare(s: Any, i: int, step: int, j: int) -> Micro:
    """Micro-batch `i` of prompts -> `num_generations` scored samples each, as the loss module's inputs (with
    `advantages`), plus the reward metrics (`reward_mean`, `reward_mean/<name>`, `reward_std`, completion
    length)."""
    cfg, acc, g = s.cfg, s.accelerator, s.cfg.grpo
    items: list[PromptRecord] = s.batches[i]
    n = g.num_generations
    prompts = [it.prompt for it in items for _ in range(n)]
    comps = sample(s, prompts, step_seed(cfg.seed, step, acc.process_index, j), g.temperature)
    texts = [c.text for c in comps]
    fields = {**_fields(items, n), "completion_tokens": [c.completion_tokens for c in comps]}
    scores = score_rewards(s.method.rewards, prompts, texts, fields, [it.where for it in items for _ in range(n)])
    total = total_reward(scores, s.method.rewards)
    adv = group_advantages(total, n, scale=g.scale_rewards)
    examples = [ex for k, it in enumerate(items)
                for ex in sampled_examples(comps[k * n: (k + 1) * n], cfg.data.max_length, it.where)]
    groups = [list(range(k * n, (k + 1) * n)) for k in range(len(items))] if s.method.share else None
    batch = collate_sequences(examples, s.tokenizer.pad_token_id, cfg.data.packing, cfg.data.max_length, groups)
    inputs = {k: v.to(acc.device) for k, v in batch.items()}
    inputs["advantages"] = adv.float().to(acc.device)
    metrics = reward_metrics(scores, s.method.rewards)
    metrics["reward_std"] = float(total.view(-1, n).std(dim=1).mean())
    metrics["completion_length"] = sum(c.completion_tokens for c in comps) / len(comps)
    return Micro(inputs, metrics, sum(len(e.input_ids) for e in examples))


def probe_inputs(s: Any, item: PromptRecord, share: bool = False) -> dict[str, Any]:
    """A prompt with two short fixed answers, for the step-0 checks of the fused head and of the shared prompt
    (`share`: forwarded once for both; any tokens do)."""
    ex = [tokenize_unpaired(Unpaired(item.prompt, [{"role": "assistant", "content": t}], True, item.where),
                            s.tokenizer, s.tokenizer.chat_template, s.cfg.data.max_length)[0] for t in ("ok", "no")]
    batch = collate_sequences(ex, s.tokenizer.pad_token_id, False, groups=[[0, 1]] if share else None)
    return {k: v.to(s.accelerator.device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(s: Any) -> dict[str, float]:
    """`eval_reward_mean` (and per function) of greedy answers to the validation prompts, sharded over ranks."""
    acc, rewards = s.accelerator, s.method.rewards
    items = [it for b in s.val_batches for it in b][acc.process_index:: acc.num_processes]
    # per function: score sum, scored count; then the total reward's sum and count
    tot = torch.zeros(len(rewards) + 1, 2, dtype=torch.float64)
    if items:
        prompts = [it.prompt for it in items]
        comps = sample(s, prompts, 0, temperature=0.0)
        texts = [c.text for c in comps]
        fields = {**_fields(items, 1), "completion_tokens": [c.completion_tokens for c in comps]}
        scores = score_rewards(rewards, prompts, texts, fields, [it.where for it in items])
        ok = torch.isfinite(scores)
        tot[:-1, 0] = torch.where(ok, scores, 0.0).sum(0)
        tot[:-1, 1] = ok.sum(0)
        tot[-1] = torch.tensor([float(total_reward(scores, rewards).sum()), len(items)])
    tot = acc.reduce(tot.to(acc.device), reduction="sum").cpu()
    mean = (tot[:, 0] / tot[:, 1].clamp(min=1)).tolist()
    out = {"eval_reward_mean": round(mean[-1], 5)}
    out.update({f"eval_reward_mean/{r.name}": round(mean[k], 5) for k, r in enumerate(rewards)})
    return out
