"""Preference tuning (DPO, ORPO, SimPO, KTO): per-sequence log-probs through the model's own head, and each
method's loss as a few lines over them.

The losses follow TRL's definitions (trl/trainer/dpo_trainer.py, kto_trainer.py, experimental/orpo, experimental/cpo)
so results and hyper-parameters carry over; each returns `(loss, metrics)` with the loss averaged over the batch
and metrics as detached 0-d tensors (the trainer reduces them over processes before logging).

The reference model is the policy's own weights with the LoRA adapter switched off (`reference_logps`): no second
copy in memory. Full fine-tuning has no adapter to switch off; there the reference log-probs are precomputed once,
before the first step (`precompute_reference_logps`), when the policy still is the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE
from .loss import _causal, head_logits  # _causal: the one 'causal LM under the PEFT wrapper' helper

Metrics = dict[str, torch.Tensor]

_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")
"""The collated batch keys the model's forward takes (pairs.collate_sequences also adds `targets`, `sequence`)."""


# -- log-probs -------------------------------------------------------------------------------------------------
def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits)[index]` without the (tokens, vocab) log-softmax tensor: gather, minus logsumexp.
    TRL's function of the same name, in its plain (non-Triton) form."""
    logits = logits.float()
    return logits.gather(-1, index[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def forward_kwargs(causal: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's model inputs. A boolean 4D mask (`pairs.collate_sequences` with groups) goes to SDPA as it is;
    the eager kernel adds its mask to the scores, so it gets 0 / the dtype's minimum instead."""
    kw = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
    m = kw.get("attention_mask")
    if m is not None and m.dim() == 4 and m.dtype == torch.bool and causal.config._attn_implementation != "sdpa":
        dtype = next(causal.parameters()).dtype
        kw["attention_mask"] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
            ~m, torch.finfo(dtype).min)
    return kw


def _head_logps(causal: Any, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return selective_log_softmax(head_logits(causal, h), t)


def token_logps(model: Any, batch: dict[str, torch.Tensor], chunk: int = 1024, fused: bool = True) -> torch.Tensor:
    """Log-probability of every trained target (`targets != IGNORE`), flattened in row-major order.

    Fused (default): the backbone once, then the model's own head (`loss.head_logits`: softcapping, logit scales)
    only at trained positions, `chunk` tokens at a time and recomputed in backward, so (tokens, vocab) logits
    never exist whole: a chosen+rejected batch doubles the tokens of an SFT batch. `fused=False` runs the model's
    whole forward and gathers from its logits: exact for any architecture, more memory (the check the trainer
    runs before step 1 compares the two, as `loss.check_loss` does for SFT)."""
    causal = _causal(model)
    kw = forward_kwargs(causal, batch)
    keep = batch["targets"] != IGNORE
    t = batch["targets"][keep]
    if not fused:
        logits = causal(**kw, use_cache=False).logits
        return selective_log_softmax(logits[keep], t)
    h = causal.get_decoder()(**kw, use_cache=False).last_hidden_state[keep]
    vocab = causal.config.get_text_config().vocab_size
    starts = range(0, max(h.shape[0], 1), chunk)  # one empty chunk when nothing is trained: (0,), still in the graph
    if h.shape[0] * vocab <= 64 * 2**20 or not torch.is_grad_enabled():  # small, or no backward: no recompute
        return torch.cat([_head_logps(causal, h[i: i + chunk], t[i: i + chunk]) for i in starts])
    return torch.cat([checkpoint(_head_logps, causal, h[i: i + chunk], t[i: i + chunk], use_reentrant=False)
                      for i in starts])


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], chunk: int = 1024, fused: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, number of trained tokens) per sequence of the batch, shape (n_seqs,) each.

    `batch["sequence"]` says which sequence each target belongs to, so padded rows and packed rows (several
    sequences back to back, positions restarting) give the same numbers. Sums, not means: DPO and KTO use sums,
    ORPO and SimPO divide by the counts (`mean = sums / counts`)."""
    lp = token_logps(model, batch, chunk, fused)
    return sum_by_sequence(lp, batch), sum_by_sequence(torch.ones_like(lp), batch)


def sum_by_sequence(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-target `values` (as `token_logps` orders them) summed per sequence, shape (n_seqs,): the same numbers
    whatever the layout (padded, packed, shared prompt), as `batch["sequence"]` names each target's sequence."""
    seq = batch["sequence"][batch["targets"] != IGNORE]
    return torch.zeros(int(batch["n_seqs"]), dtype=values.dtype, device=values.device).index_add(0, seq, values)


@torch.no_grad()
def reference_logps(model: Any, batch: dict[str, torch.Tensor], chunk: int = 1024, fused: bool = True
                    ) -> torch.Tensor:
    """Summed log-probs per sequence under the reference: the same weights with the adapter off (peft's
    `disable_adapter()`), so no second model in memory. With a fresh LoRA adapter (B = 0) this is exactly the
    policy at step 0, as DPO assumes; a run that starts from a trained adapter gets the base model instead."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the reference model is the base weights with the LoRA adapter switched off, and this model "
                         "has no adapter (full fine-tuning). Precompute the reference log-probs before the first "
                         "step instead (precompute_reference_logps), or use orpo / simpo, which need no reference.")
    with model.disable_adapter():
        return sequence_logps(model, batch, chunk, fused)[0]


@torch.no_grad()
def precompute_reference_logps(model: Any, batches: Iterable[dict[str, torch.Tensor]], chunk: int = 1024,
                               adapter_off: bool = True) -> list[torch.Tensor]:
    """Reference sums for each batch, computed once before training (kept on the CPU).

    Saves the reference forward at every step (a third of a DPO step) and works for full fine-tuning too
    (`adapter_off=False`: the policy before its first step is the reference). The batches must be the same ones,
    in the same order, that training will see; the trainer stores the result by record index."""
    was_training = model.training
    model.eval()  # no dropout: the reference is a fixed function
    out = [(reference_logps(model, b, chunk) if adapter_off else sequence_logps(model, b, chunk)[0]).cpu()
           for b in batches]
    model.train(was_training)
    return out



@torch.no_grad()
def count_preferred(model: Any, batches: Iterable[dict[str, torch.Tensor]], method: str,
                    reference: list[torch.Tensor] | None = None, chunk: int = 1024) -> tuple[int, int]:
    """(pairs whose chosen answer the model ranks first, pairs): eval's `preference_accuracy` is their ratio,
    summed over processes first. Ranked by each method's own reward: DPO's log-ratio to the reference (the
    precomputed `reference` sums if given, else the adapter switched off; beta does not change the sign), and
    the mean log-prob per token for ORPO and SimPO. Batches come from `pairs.collate_pairs`."""
    hits = total = 0
    for i, b in enumerate(batches):
        sums, counts = sequence_logps(model, b, chunk)
        if method == "dpo":
            ref = reference[i].to(sums.device) if reference is not None else reference_logps(model, b, chunk)
            score = sums - ref
        else:
            score = sums / counts.clamp(min=1)
        c, r = score.chunk(2)
        hits += int((c > r).sum())
        total += c.numel()
    return hits, total

# -- losses ----------------------------------------------------------------------------------------------------
def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logp: torch.Tensor,
                  rejected_logp: torch.Tensor) -> Metrics:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"reward_margin": (c - r).mean(), "reward_accuracy": (c > r).float().mean(), "reward_chosen": c.mean(),
            "reward_rejected": r.mean(), "logp_chosen": chosen_logp.detach().mean(),
            "logp_rejected": rejected_logp.detach().mean()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization over summed log-probs (one value per pair).

    With the log-ratio margin  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    - `sigmoid` (Rafailov et al. 2023, arXiv:2305.18290, eq. 7):  L = -log sigmoid(beta h); with label smoothing
      eps (conservative DPO, Mitchell 2023): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    - `ipo` (Azar et al. 2023, arXiv:2310.12036, eq. 17):  L = (h' - 1 / (2 beta))^2, where h' uses the log-ratios
      divided by each completion's token count, as TRL does (confirmed with the IPO authors), so the squared loss
      does not grow with length: pass `chosen_tokens` / `rejected_tokens`.
    - `hinge` (SLiC, Zhao et al. 2023, arXiv:2305.10425):  L = max(0, 1 - beta h).

    The implicit rewards beta * (log pi - log ref) give the metrics: reward_margin, reward_accuracy (the share of
    pairs whose chosen reward is higher), reward_chosen / reward_rejected, and the mean log-probs."""
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_lr - rejected_lr
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo.label_smoothing applies to loss_type=sigmoid only, not {loss_type!r}; set it to 0.")
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo loss_type=ipo normalises by completion length: pass chosen_tokens and "
                             "rejected_tokens (the counts sequence_logps returns).")
        h_mean = chosen_lr / chosen_tokens.clamp(min=1) - rejected_lr / rejected_tokens.clamp(min=1)
        losses = (h_mean - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"dpo.loss_type must be sigmoid, ipo or hinge, got {loss_type!r}.")
    return losses.mean(), _pair_metrics(beta * chosen_lr, beta * rejected_lr, policy_chosen, policy_rejected)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: two formulas either side of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logp_mean: torch.Tensor, rejected_logp_mean: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7); no reference model.

    With P = exp(mean log-prob per token) of a completion and odds(y) = P / (1 - P):

        L = L_SFT - beta * mean(log sigmoid(log odds(y_w) - log odds(y_l)))

    where log odds = logp - log(1 - exp(logp)) and L_SFT = `chosen_nll`, the chosen completions' mean NLL per
    token (the SFT loss on the chosen side). `beta` is the paper's lambda. Rewards (for the metrics) are
    beta * mean log-prob, as in TRL. Log-probs are clamped just below 0, where log(1 - P) is -inf."""
    dtype = torch.promote_types(chosen_logp_mean.dtype, torch.float32)  # bf16 log(1 - P) is too coarse
    c = chosen_logp_mean.to(dtype).clamp(max=-1e-7)
    r = rejected_logp_mean.to(dtype).clamp(max=-1e-7)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - beta * ratio.mean()
    m = _pair_metrics(beta * c, beta * r, chosen_logp_mean, rejected_logp_mean)
    m.update(log_odds_ratio=ratio.detach().mean(), log_odds_chosen=log_odds.detach().mean(), nll=chosen_nll.detach())
    return loss, m


def simpo_loss(chosen_logp_mean: torch.Tensor, rejected_logp_mean: torch.Tensor, beta: float = 2.0,
               gamma: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734, eq. 6); no reference model.

        L = -log sigmoid(beta * mean logp(y_w) - beta * mean logp(y_l) - gamma)

    The reward is the length-normalised log-prob times beta; gamma is the target reward margin. TRL's CPO trainer
    (loss_type=simpo) writes the same as beta * (delta - gamma / beta). Defaults are the paper's scale (beta 2,
    gamma / beta 0.5); its tuned values are beta 2-2.5, gamma / beta 0.3-0.8."""
    h = chosen_logp_mean - rejected_logp_mean
    losses = -F.logsigmoid(beta * h - gamma)
    return losses.mean(), _pair_metrics(beta * chosen_logp_mean, beta * rejected_logp_mean, chosen_logp_mean,
                                        rejected_logp_mean)


def kto_kl_estimate(policy_kl_logp: torch.Tensor, ref_kl_logp: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of log pi - log ref over mismatched (prompt, completion) pairs
    (pairs.mismatched), clamped at 0 and detached, as the paper estimates KL(pi || ref) without gradient.
    Under several processes, average it over all of them (TRL gathers) before `kto_loss`."""
    return (policy_kl_logp - ref_kl_logp).mean().clamp(min=0).detach()


def kto_loss(policy_logp: torch.Tensor, ref_logp: torch.Tensor, labels: torch.Tensor, kl_estimate: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7), for unpaired data.

    With r = log pi(y|x) - log ref(y|x) (summed log-probs) and z0 = `kl_estimate`:

        desirable (label true):    L = w_d * (1 - sigmoid(beta (r - z0)))
        undesirable (label false): L = w_u * (1 - sigmoid(beta (z0 - r)))

    averaged over the batch. The weights balance unequal counts: the paper keeps
    w_d * n_desirable / (w_u * n_undesirable) in [1, 4/3]."""
    lr = policy_logp - ref_logp
    good = labels.bool()
    z = kl_estimate.detach()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (lr - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - lr))))
    rewards = beta * lr.detach()
    nan = torch.full((), float("nan"), device=lr.device)
    chosen = rewards[good].mean() if good.any() else nan
    rejected = rewards[~good].mean() if (~good).any() else nan
    return losses.mean(), {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": chosen - rejected,
                           "kl": z, "logp_chosen": policy_logp.detach()[good].mean() if good.any() else nan,
                           "logp_rejected": policy_logp.detach()[~good].mean() if (~good).any() else nan}
