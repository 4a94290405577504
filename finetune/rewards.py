"""GRPO's rewards and objective: built-in reward functions, user functions named `module:function`,
group-normalised advantages and the clipped surrogate loss with an optional KL penalty.

Calling convention (TRL's): `fn(prompts, completions, **fields) -> list[float | None]`, one value per completion.
`prompts` are the records' prompts (a string or a message list, repeated once per sample), `completions` the
sampled answers as text, and `fields` every other field of the records (`answer=[...]`), one list entry per
completion, plus `completion_tokens` (the answers' token counts). A function should take `**kwargs` so new fields
never break it. `None` means "does not apply to this completion": it counts as missing, not zero.

In the config a reward is a built-in name, `module:function`, or a mapping with `name`, an optional `weight`
(default 1) and the built-in's arguments:
    rewards: [json, {name: exact_match, field: answer}, {name: regex, pattern: "^\\d+$"}, {name: my.mod:fn}]
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError
from .errors import TrainingError

RewardFn = Callable[..., list[float | None]]


class RewardError(TrainingError):
    """A reward function failed or returned something unusable; the message names the function and the record."""


class _MissingField(ValueError):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Reward:
    name: str
    """What metrics call it: `reward_mean/<name>`."""
    fn: RewardFn
    weight: float = 1.0


# -- built-ins ---------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace / quotes / final punctuation and inner runs of spaces do not count: a model that
    answers "Paris." to "paris" is right. Numbers compare by value ("4.0" == "4")."""
    s = " ".join(str(text).split()).casefold().strip(" .,;:!?\"'`")
    try:
        return repr(float(s.replace(",", "")))
    except ValueError:
        return s


def exact_match(field: str = "answer", pattern: str | None = None) -> RewardFn:
    """1.0 when the completion equals the record's `field` after `normalize_answer` (the field may also be a list
    of accepted answers), else 0.0. `pattern`: compare its first group instead of the whole completion, e.g.
    `Answer:\\s*(.+)` for a model that reasons first; no match scores 0."""
    rx = re.compile(pattern) if pattern else None
    if rx is not None and rx.groups < 1:
        raise ConfigError(f"exact_match: pattern {pattern!r} needs a group ( ... ) around the answer.")

    def reward(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float | None]:
        if field not in fields:
            raise _MissingField(0, f"exact_match: the records have no `{field}` field; add it, or set `field`.")
        out: list[float | None] = []
        for i, (text, gold) in enumerate(zip(completions, fields[field])):
            if gold is None:
                raise _MissingField(i, f"exact_match: the record has no `{field}`; add it, or remove the record.")
            m = rx.search(text) if rx else None
            if rx is not None and m is None:
                out.append(0.0)
                continue
            got = normalize_answer(m.group(1) if m else text)
            golds = gold if isinstance(gold, list) else [gold]
            out.append(float(any(got == normalize_answer(g) for g in golds)))
        return out

    return reward


def regex_match(pattern: str, full: bool = False) -> RewardFn:
    """1.0 when `pattern` matches the completion (anywhere; `full`: the whole stripped completion), else 0.0: a
    format reward, e.g. `<think>.*</think>` with DOTALL written inline as `(?s)`."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"regex reward: pattern {pattern!r} is not a valid regular expression ({e}).") from None

    def reward(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float | None]:
        return [float(bool(rx.fullmatch(c.strip()) if full else rx.search(c))) for c in completions]

    return reward


_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*)\n```$", re.DOTALL)


def valid_json(schema: dict | None = None) -> RewardFn:
    """1.0 when the completion is JSON (a whole-answer ``` fence is allowed) and, with `schema`, valid against it
    (needs the `jsonschema` package), else 0.0."""
    validator = None
    if schema is not None:
        try:
            import jsonschema
        except ImportError:
            raise ConfigError("json reward with a `schema` needs the jsonschema package: pip install jsonschema "
                              "(or drop `schema` to reward any valid JSON).") from None
        try:
            validator = jsonschema.validators.validator_for(schema)(schema)
            validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"json reward: `schema` is not a valid JSON schema ({e.message}).") from None

    def score(text: str) -> float:
        m = _FENCE.match(text.strip())
        try:
            obj = json.loads(m.group(1) if m else text)
        except ValueError:
            return 0.0
        return float(validator is None or validator.is_valid(obj))

    def reward(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float | None]:
        return [score(c) for c in completions]

    return reward


def length_penalty(max_tokens: int, soft: int = 0) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), in tokens:
    0 up to `max_tokens - soft`, then falling linearly to -1 at `max_tokens`, and -1 beyond. Add it to a task
    reward so long answers lose a little before they are cut off."""
    if max_tokens < 1 or not 0 <= soft <= max_tokens:
        raise ConfigError(f"length reward: needs max_tokens >= 1 and 0 <= soft <= max_tokens, got {max_tokens}, {soft}.")

    def reward(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float | None]:
        if "completion_tokens" not in fields:
            raise _MissingField(0, "length reward: no `completion_tokens` passed; the GRPO loop passes the answers' "
                                   "token counts.")
        out: list[float | None] = []
        for n in fields["completion_tokens"]:
            if n <= max_tokens - soft:
                out.append(0.0)
            elif n <= max_tokens:
                out.append((max_tokens - soft - n) / soft)
            else:
                out.append(-1.0)
        return out

    return reward


BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": exact_match, "regex": regex_match, "json": valid_json, "length": length_penalty}


# -- loading and calling -----------------------------------------------------------------------------------------
def load_reward(spec: str | dict[str, Any], where: str = "grpo.rewards") -> Reward:
    """A config entry -> Reward. Errors name `where` (the config key) and the fix."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}: a reward is a built-in name ({', '.join(BUILTINS)}), `module:function`, or a "
                          f"mapping with `name` (and `weight`, arguments), got {spec!r}.")
    args = dict(spec)
    name, weight = args.pop("name"), args.pop("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise ConfigError(f"{where}: `weight` of reward `{name}` must be a number, got {weight!r}.")
    if name in BUILTINS:
        try:
            fn = BUILTINS[name](**args)
        except TypeError as e:
            raise ConfigError(f"{where}: reward `{name}`: {e}. See finetune/rewards.py for its arguments.") from None
        shown = ",".join(f"{k}={v}" for k, v in args.items() if not isinstance(v, dict))
        return Reward(f"{name}({shown})" if shown else name, fn, float(weight))
    if ":" not in name:
        raise ConfigError(f"{where}: unknown reward `{name}`. Use a built-in ({', '.join(BUILTINS)}) or "
                          "`module:function` for your own.")
    if args:
        raise ConfigError(f"{where}: reward `{name}` got arguments {sorted(args)}; your own functions take none "
                          "(read settings from the record's fields, or wrap the function).")
    return Reward(name, _import_function(name, where), float(weight))


def _import_function(name: str, where: str) -> RewardFn:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a user module can fail to import in any way
        raise ConfigError(f"{where}: cannot import `{module_name}` for reward `{name}` ({type(e).__name__}: {e}). "
                          "Put the module on PYTHONPATH (or in the folder you run from) and check its name.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"{where}: `{module_name}` has no function `{attr}` (it has: {', '.join(found) or 'none'}). "
                          "Write it as `module:function`, e.g. `my_rewards:brevity`.")
    return fn


def score_rewards(rewards: Sequence[Reward], prompts: Sequence[Any], completions: Sequence[str],
                  fields: dict[str, list[Any]], where: Sequence[str]) -> torch.Tensor:
    """(len(completions), len(rewards)) float64 scores, NaN where a function returned None. `where[i]` is the
    file:line of completion i's record, for the error when a function fails or returns something unusable."""
    n = len(completions)
    out = torch.empty(n, len(rewards), dtype=torch.float64)
    for k, r in enumerate(rewards):
        try:
            values = r.fn(prompts=list(prompts), completions=list(completions), **fields)
        except _MissingField as e:
            raise RewardError(f"{where[e.index]}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a user function can fail in any way; say which one and where
            raise RewardError(f"reward `{r.name}` raised {type(e).__name__}: {e} (on the batch starting at "
                              f"{where[0]}). Fix the function; it is called as fn(prompts, completions, **fields)."
                              ) from e
        if not isinstance(values, list | tuple) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
            raise RewardError(f"reward `{r.name}` must return a list of {n} numbers (one per completion), got {got}.")
        for i, v in enumerate(values):
            if v is None:
                out[i, k] = math.nan
            elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[i, k] = float(v)
            else:
                raise RewardError(f"{where[i]}: reward `{r.name}` returned {v!r}; return a finite number, or None "
                                  "when it does not apply.")
    return out


def total_reward(scores: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """Weighted sum over functions, skipping missing (None) scores: a function that does not apply to a completion
    neither rewards nor punishes it."""
    w = torch.tensor([r.weight for r in rewards], dtype=scores.dtype)
    return (scores * w).nansum(dim=1)


def reward_metrics(scores: torch.Tensor, rewards: Sequence[Reward]) -> dict[str, float]:
    """`reward_mean/<name>` and `reward_std/<name>` per function (over the completions it applied to: NaN, "does
    not apply", is left out; the std is unbiased, 0 with fewer than 2 scores, as TRL's `nanstd`) and `reward_mean`
    of the total."""
    out: dict[str, float] = {}
    for k, r in enumerate(rewards):
        col = scores[:, k][~scores[:, k].isnan()]
        out[f"reward_mean/{r.name}"] = float(col.mean()) if col.numel() else float("nan")
        out[f"reward_std/{r.name}"] = float(col.std()) if col.numel() > 1 else 0.0
    out["reward_mean"] = float(total_reward(scores, rewards).mean())
    return out


# -- GRPO objective ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, arXiv:2402.03300, sec. 4.1.2): each reward against the other samples
    of the same prompt, A_i = (r_i - mean(group)) / (std(group) + eps), with the unbiased std and eps = 1e-4 as
    in TRL. `rewards` holds `group_size` consecutive samples per prompt. A group whose samples all score the same
    gets 0: it says nothing about which answer is better. `scale=False` keeps r - mean (Dr. GRPO's advice, as
    dividing by std favours prompts that are too easy or too hard)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
        adv = adv / (std + eps)
    return torch.nan_to_num(adv.view(-1), nan=0.0)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating KL
    divergence"): unbiased with samples from pi, and never negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, sequence: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate (Shao et al. 2024, eq. 3; PPO's clip, Schulman et al. 2017) over trained tokens.

    Per token t of completion i, with ratio rho = exp(logp - old_logp):

        l_t = -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i) + beta * k3(pi, ref)

    averaged over each completion's tokens, then over completions (TRL's loss_type=grpo). Tensors are flat
    per-token (`preference.token_logps` order); `sequence` gives each token's completion, indexing `advantages`.
    With one optimisation pass per generation (TRL's default), old_logp = logp.detach(): rho = 1 and the loss is
    the policy gradient A * grad logp. `epsilon_high` > epsilon is DAPO's clip-higher."""
    n = advantages.shape[0]
    ratio = torch.exp(logp - old_logp)
    a = advantages[sequence].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    per_token = -torch.minimum(ratio * a, clipped * a)
    metrics: dict[str, torch.Tensor] = {}
    if beta:
        if ref_logp is None:
            raise ValueError("grpo.beta > 0 needs the reference log-probs (ref_logp) for the KL penalty.")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        metrics["kl"] = kl.detach().mean()
    zeros = torch.zeros(n, dtype=per_token.dtype, device=per_token.device)
    counts = zeros.index_add(0, sequence, torch.ones_like(per_token)).clamp(min=1)
    loss = (zeros.index_add(0, sequence, per_token) / counts).mean()
    metrics["clip_ratio"] = ((ratio != clipped) & (ratio * a > clipped * a)).float().mean().detach()
    return loss, metrics
