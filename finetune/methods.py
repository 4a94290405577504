"""Preference tuning (DPO, ORPO, SimPO, KTO) and GRPO inside the one training loop.

The loop in `trainer.py` stays the SFT loop; what differs per method lives here:
- data: `check_data_kind` (SFT given pairs says which method to set), `build_batches` (pairs, KTO answers with
  their mismatched KL partners, GRPO prompts), `preview_examples` (what `tunesmith data preview` shows);
- the forward: `PreferenceModel`, the module DDP wraps (as `LossModel` for SFT), whose `forward` computes the
  whole method loss from per-sequence log-probs (`preference.py`, `rewards.py`) and returns
  `(loss * units, metrics, units)`: the loop divides the summed loss by the step's units (pairs, answers,
  completions) as it divides SFT's by trained tokens, so accumulation and several processes give the gradient of
  one big batch;
- `prepare`: one micro-batch's forward arguments (precomputed reference, KTO's KL estimate averaged over
  processes, GRPO's samples and advantages from `grpo.py`), `MetricSums` (per-step metrics averaged over
  micro-batches and ranks), `evaluate` (eval loss and preference accuracy) and `check_logps` (the step-0 check).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from .config import Config, ConfigError
from .data import (
    IGNORE,
    DataError,
    DataReport,
    Example,
    Record,
    build_examples,
    examples_in,
    make_example,
    resolve_chat_template,
)
from .loss import _causal, low_precision  # _causal: the one 'causal LM under the PEFT wrapper' helper
from .pairs import (
    PairExample,
    PromptRecord,
    Unpaired,
    build_pair_examples,
    check_prompt_length,
    collate_pairs,
    collate_sequences,
    detect_kind,
    mismatched,
    parse_record,
    tokenize_unpaired,
)
from .preference import (
    dpo_loss,
    kto_loss,
    orpo_loss,
    precompute_reference_logps,
    reference_logps,
    sequence_logps,
    simpo_loss,
    sum_by_sequence,
    token_logps,
)

log = logging.getLogger(__name__)

PAIR_METHODS = ("dpo", "orpo", "simpo")
UNITS = {"sft": "target_tokens", "dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "answers",
         "grpo": "completions"}
"""What each method's loss is averaged over (the `metrics.jsonl` key that counts them per step)."""


@dataclass
class KtoExample:
    example: Example
    label: bool
    item: Unpaired
    kl: Example | None = None
    """This prompt with the previous answer of its micro-batch (`pairs.mismatched`): KTO's KL estimate."""


@dataclass
class Micro:
    """One micro-batch, ready for the loss module: its keyword tensors, metrics computed outside the forward (GRPO's
    rewards) and how many tokens it holds (tokens/s)."""

    inputs: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


@dataclass
class MethodState:
    """What a method keeps beside the model: precomputed reference sums per micro-batch, GRPO's rewards and the
    run's own Generator."""

    ref: list[torch.Tensor] | None = None
    val_ref: list[torch.Tensor] | None = None
    rewards: list[Any] = field(default_factory=list)
    generator: Any = None
    share: bool = False
    """Forward each pair's / sample group's prompt once (`can_share`)."""


# -- data ------------------------------------------------------------------------------------------------------
def check_data_kind(method: str, rec: Record) -> None:
    """SFT given preference, KTO or prompt-only records would fail on the first record's format; say which method
    the data is for instead."""
    kind = detect_kind(rec)
    if method != "sft" or kind == "sft":
        return
    fix = {"pair": "set method: dpo (or orpo / simpo)", "unpaired": "set method: kto",
           "prompt": "set method: grpo and list grpo.rewards"}[kind]
    raise ConfigError(f"{rec.where}: this record is {kind} data (keys {sorted(rec.data)}) but method is sft; {fix}.")


def _template(tok: Any, cfg: Config) -> str:
    template = resolve_chat_template(tok, cfg.data.chat_template)
    if not template:
        raise ConfigError(f"method {cfg.method} needs a chat template and the tokenizer has none; set "
                          "data.chat_template (e.g. `chatml`).")
    return template


def load_items(cfg: Config, tok: Any, records: list[Record], report: DataReport, method: str | None = None
               ) -> list[Any]:
    """The records as what `method` (default: the config's) trains on: PairExamples, KtoExamples or
    PromptRecords. Bad records raise a DataError naming file:line (or are skipped and counted with
    data.on_bad_record=skip)."""
    d, template = cfg.data, _template(tok, cfg)
    skip = d.on_bad_record == "skip"
    method = method or cfg.method
    if method in PAIR_METHODS:
        return build_pair_examples(records, tok, template, d.max_length, d.system_prompt, report, skip_bad=skip)
    out: list[Any] = []
    for rec in records:
        report.records += 1
        try:
            item = parse_record(rec, method, d.system_prompt)
            if isinstance(item, Unpaired):
                ex, cut = tokenize_unpaired(item, tok, template, d.max_length)
                report.truncated += bool(cut)
                report.tokens_cut += cut
                report.tokens += len(ex.input_ids)
                report.target_tokens += ex.n_targets
                out.append(KtoExample(ex, item.label, item))
            else:
                assert isinstance(item, PromptRecord)
                report.tokens += check_prompt_length(item, tok, template, d.max_length, cfg.grpo.max_new_tokens)
                out.append(item)
        except DataError as e:
            if not skip:
                raise
            report.skipped.append(str(e))
    return out


def build_batches(cfg: Config, tok: Any, train_recs: list[Record], val_recs: list[Record], report: DataReport
                  ) -> tuple[list[list[Any]], list[list[Any]]]:
    """Training and validation micro-batches (lists of pairs, KTO answers or prompts): shuffled with the seed, the
    two sides of a pair always in one micro-batch, as `data.micro_batches` does for SFT examples."""
    train = load_items(cfg, tok, train_recs, report)
    val = load_items(cfg, tok, val_recs, DataReport())
    if not train:
        raise ConfigError(f"{cfg.data.train}: no usable training records for method {cfg.method}. "
                          + "; ".join(report.lines()))
    if cfg.method == "kto":
        _check_kto_balance(cfg, train)
    random.Random(cfg.seed).shuffle(train)
    n = cfg.train.micro_batch_size
    batches = [train[i: i + n] for i in range(0, len(train), n)]
    val_batches = [val[i: i + n] for i in range(0, len(val), n)]
    if cfg.method == "kto":
        template = _template(tok, cfg)
        for b in batches + val_batches:
            for x, partner in zip(b, mismatched([x.item for x in b])):
                x.kl = tokenize_unpaired(partner, tok, template, cfg.data.max_length)[0]
    return batches, val_batches


def _check_kto_balance(cfg: Config, items: list[KtoExample]) -> None:
    good = sum(x.label for x in items)
    bad = len(items) - good
    k = cfg.kto
    if good == 0 or bad == 0:
        log.warning("kto: the training data has %d desirable and %d undesirable answers; KTO learns from both "
                    "kinds, so add the missing one.", good, bad)
        return
    ratio = k.desirable_weight * good / (k.undesirable_weight * bad)
    if not 1 <= ratio <= 4 / 3:
        log.warning("kto: desirable_weight * %d desirable / (undesirable_weight * %d undesirable) = %.2f; the KTO "
                    "paper advises [1, 4/3]. Set kto.desirable_weight=%.3g to balance them.", good, bad, ratio,
                    k.undesirable_weight * bad / good)


def preview_examples(records: list[Record], tok: Any, cfg: Config, report: DataReport
                     ) -> list[list[tuple[str, Example]]]:
    """What `tunesmith data preview` shows, per record its titled parts, by the record's kind: an SFT example as it
    is (title ""), both sides of a preference pair (chosen, then rejected), a KTO answer with its label, and a GRPO
    prompt (nothing trained: the answers are sampled during training)."""
    if not records or detect_kind(records[0]) == "sft":
        return [[("", ex)] for ex in build_examples(records, tok, cfg.data, report)]
    kind = detect_kind(records[0])
    method = cfg.method if cfg.method != "sft" else {"pair": "dpo", "unpaired": "kto", "prompt": "grpo"}[kind]
    out: list[list[tuple[str, Example]]] = []
    for item in load_items(cfg, tok, records, report, method):
        if isinstance(item, PairExample):
            out.append([("chosen", item.chosen), ("rejected", item.rejected)])
        elif isinstance(item, KtoExample):
            out.append([("desirable" if item.label else "undesirable", item.example)])
        else:
            text = tok.apply_chat_template(item.prompt, chat_template=_template(tok, cfg), tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            fields = ", ".join(f"{k}={v!r:.40}" for k, v in item.fields.items())
            out.append([(f"prompt (answers are sampled in training; fields: {fields or 'none'})",
                         make_example(ids, [False] * len(ids), len(ids), item.where)[0])])
    return out


def step_units(cfg: Config, group: list[list[Any]]) -> int:
    """What the step's loss is averaged over: pairs, KTO answers or GRPO completions (all ranks' micro-batches)."""
    n = sum(len(b) for b in group)
    return n * cfg.grpo.num_generations if cfg.method == "grpo" else n


def can_share(cfg: Config, model: Any) -> bool:
    """`data.share_prompt` where the model reads a custom 4D mask as it is: the `sdpa` or `eager` kernel, attention
    in every layer (a linear-attention or state-space layer would ignore the mask) and no sliding window shorter
    than a shared row. `check_logps` then compares the shared forward with whole sequences before step 1."""
    if not cfg.data.share_prompt or cfg.method not in (*PAIR_METHODS, "grpo"):
        return False
    causal = _causal(model)
    tc = causal.config.get_text_config()
    kinds = set(getattr(tc, "layer_types", None) or [])
    window = getattr(tc, "sliding_window", None)
    windowed = "sliding_attention" in kinds or (not kinds and window is not None)
    return (causal.config._attn_implementation in ("sdpa", "eager")
            and kinds <= {"full_attention", "sliding_attention"}
            and not (windowed and window is not None and window < 2 * cfg.data.max_length))


def collate(cfg: Config, batch: list[Any], pad_id: int, device: torch.device, share: bool = False
            ) -> dict[str, Any]:
    """One micro-batch as the loss module's keyword tensors: chosen then rejected for pairs (`share`: their prompt
    forwarded once), the answers and their labels for KTO."""
    d = cfg.data
    if cfg.method == "kto":
        t = collate_sequences([x.example for x in batch], pad_id, d.packing, d.max_length)
        t["labels"] = torch.tensor([x.label for x in batch])
    else:
        t = collate_pairs(batch, pad_id, d.packing, d.max_length, share)
    return {k: v.to(device) for k, v in t.items()}


def _kl_inputs(cfg: Config, batch: list[KtoExample], pad_id: int, device: torch.device) -> dict[str, Any]:
    t = collate_sequences([x.kl for x in batch if x.kl is not None], pad_id, cfg.data.packing, cfg.data.max_length)
    return {k: v.to(device) for k, v in t.items()}


def _orpo_weight(group: list[list[Any]]) -> float:
    """Pairs / chosen tokens of the step: ORPO's NLL term is per chosen token, its odds-ratio term per pair."""
    pairs = [p for b in group for p in b]
    return len(pairs) / max(1, sum(p.chosen.n_targets for p in pairs))


# -- the loss module -------------------------------------------------------------------------------------------
class PreferenceModel(torch.nn.Module):
    """The method's whole loss in one forward, so DDP syncs gradients around it (as `loss.LossModel` for SFT).

    Returns `(loss * units, metrics, units)`: the loss summed over the micro-batch's pairs / answers / completions,
    the metrics as detached 0-d means, and their count. `mode="kl"` (KTO, no grad) returns the mean log-ratio of
    the mismatched answers; `mode="fused"` / `"plain"` the token log-probs for the step-0 check."""

    def __init__(self, peft_model: torch.nn.Module, chunk: int, autocast_dtype: torch.dtype | None, fused: bool,
                 cfg: Config) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.chunk = chunk
        self.autocast_dtype = autocast_dtype
        self.fused = fused
        self.cfg = cfg
        self._no_split_modules = getattr(getattr(peft_model, "get_base_model", lambda: peft_model)(),
                                         "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor, n_seqs: torch.Tensor,
                ref: torch.Tensor | None = None, labels: torch.Tensor | None = None, nll_weight: float = 1.0,
                kl_estimate: torch.Tensor | None = None, advantages: torch.Tensor | None = None, mode: str = "loss",
                **kw: torch.Tensor) -> Any:
        from .rewards import grpo_loss

        batch = {"input_ids": input_ids, "targets": targets, "sequence": sequence, "n_seqs": n_seqs, **kw}
        c, m = self.cfg, cast(Any, self.peft_model)
        with low_precision(m, input_ids.device.type, self.autocast_dtype):
            if mode in ("fused", "plain"):
                return token_logps(m, batch, self.chunk, fused=mode == "fused")
            if c.method == "grpo":
                logp = token_logps(m, batch, self.chunk, self.fused)
                ref_logp = None
                if c.grpo.beta:
                    with torch.no_grad(), m.disable_adapter():
                        ref_logp = token_logps(m, batch, self.chunk, self.fused)
                assert advantages is not None
                loss, metrics = grpo_loss(logp, logp.detach(), advantages, sequence[targets != IGNORE],
                                          c.grpo.epsilon, c.grpo.epsilon_high, c.grpo.beta, ref_logp)
                n = int(n_seqs)
                return loss * n, metrics, n
            sums, counts = sequence_logps(m, batch, self.chunk, self.fused)
            if c.method in ("dpo", "kto") and ref is None:
                ref = reference_logps(m, batch, self.chunk, self.fused)
        if mode == "kl":
            assert ref is not None
            return (sums - ref).mean()
        if c.method == "kto":
            assert labels is not None and kl_estimate is not None and ref is not None
            loss, metrics = kto_loss(sums, ref, labels, kl_estimate, c.kto.beta, c.kto.desirable_weight,
                                     c.kto.undesirable_weight)
            return loss * len(sums), metrics, len(sums)
        n = len(sums) // 2  # sequences 0..n-1 are the chosen answers, n..2n-1 the rejected ones
        mean = sums / counts.clamp(min=1)
        if c.method == "dpo":
            assert ref is not None
            loss, metrics = dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], c.dpo.beta, c.dpo.loss_type,
                                     c.dpo.label_smoothing, counts[:n], counts[n:])
        elif c.method == "orpo":
            # the NLL term normalised by the step's chosen tokens once the loop divides by the step's pairs
            loss, metrics = orpo_loss(mean[:n], mean[n:], -sums[:n].sum() * nll_weight / n, c.orpo.beta)
        else:
            loss, metrics = simpo_loss(mean[:n], mean[n:], c.simpo.beta, c.simpo.gamma)
        return loss * n, metrics, n


# -- one micro-batch ---------------------------------------------------------------------------------------------
def prepare(s: Any, i: int, step: int, j: int, group: list[list[Any]]) -> Micro:
    """Micro-batch `i` (the `j`-th of this rank in `step`) as the loss module's arguments: SFT's collated
    examples; the precomputed reference; KTO's KL estimate, a no-grad forward over the mismatched answers averaged
    over processes before the loss uses it; GRPO's sampled answers and advantages (`grpo.prepare`)."""
    cfg, acc, st = s.cfg, s.accelerator, s.method
    if cfg.method == "sft":
        batch = s.batches[i]
        return Micro(s.inputs(batch, train=True), tokens=sum(len(ex.input_ids) for ex in examples_in(batch)))
    if cfg.method == "grpo":
        from .grpo import prepare as grpo_prepare

        return grpo_prepare(s, i, step, j)
    batch = s.batches[i]
    inputs = collate(cfg, batch, s.tokenizer.pad_token_id, acc.device, st.share)
    ref = st.ref[i].to(acc.device) if st.ref is not None else None
    if cfg.method == "orpo":
        inputs["nll_weight"] = _orpo_weight(group)
    if cfg.method == "kto":
        ref_main, ref_kl = ref.chunk(2) if ref is not None else (None, None)
        with torch.no_grad():
            kl = s.loss_model(**_kl_inputs(cfg, batch, s.tokenizer.pad_token_id, acc.device), ref=ref_kl, mode="kl")
        inputs["kl_estimate"] = acc.reduce(kl.detach().float(), reduction="mean").clamp(min=0)
        ref = ref_main
    if ref is not None:
        inputs["ref"] = ref
    seqs = [e for x in batch for e in ((x.chosen, x.rejected) if isinstance(x, PairExample) else (x.example,))]
    return Micro(inputs, {}, sum(len(e.input_ids) for e in seqs))


class MetricSums:
    """Per-step metrics: each micro-batch's means weighted by its units, NaN (KTO without one kind of answer)
    left out, summed over ranks in one all-reduce."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.weights: dict[str, float | torch.Tensor] = {}

    def add(self, out: Any, extra: dict[str, float]) -> torch.Tensor:
        """The loss of a loss module's output; `(loss, metrics, units)` outputs also add their metrics."""
        if not isinstance(out, tuple):
            return out
        loss, metrics, n = out
        for k, v in {**metrics, **extra}.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            ok = torch.isfinite(v)
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v * n, 0.0)
            self.weights[k] = self.weights.get(k, 0.0) + ok.float() * n
        return loss

    def reduce(self, acc: Any) -> dict[str, float | None]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        t = torch.stack([torch.stack([torch.as_tensor(self.sums[k]).float().to(acc.device),
                                      torch.as_tensor(self.weights[k]).float().to(acc.device)]) for k in keys])
        t = acc.reduce(t, reduction="sum")
        out = {k: round(float(t[n, 0] / t[n, 1]), 5) if t[n, 1] > 0 else None for n, k in enumerate(keys)}
        chosen, rejected = out.get("reward_chosen"), out.get("reward_rejected")
        if chosen is not None and rejected is not None:
            # a difference of means: also for KTO steps whose micro-batches each lack one kind of answer
            out["reward_margin"] = round(chosen - rejected, 5)
        return out


# -- before the first step ---------------------------------------------------------------------------------------
def prepare_state(s: Any, resume: bool) -> MethodState:
    """Rewards and the Generator (GRPO), or the precomputed reference (`precompute_ref`): with LoRA the adapter-off
    base, which training never changes; with full fine-tuning the policy before step 1, saved to
    RUN/reference_logps.pt so a resumed run uses the same one."""
    cfg, acc = s.cfg, s.accelerator
    st = MethodState(share=can_share(cfg, s.model))
    if cfg.method == "grpo":
        from .grpo import make_generator
        from .rewards import load_reward

        st.rewards = [load_reward(r, where=f"grpo.rewards[{k}]") for k, r in enumerate(cfg.grpo.rewards)]
        st.generator = make_generator(s)
        return st
    if not (cfg.method == "dpo" and cfg.dpo.precompute_ref) and not (cfg.method == "kto" and cfg.kto.precompute_ref):
        return st
    full = cfg.finetuning_type == "full"
    saved = Path(s.out) / "reference_logps.pt"
    if full and resume and saved.exists():
        st.ref, st.val_ref = torch.load(saved)
        return st
    pad = s.tokenizer.pad_token_id
    root = acc.unwrap_model(s.loss_model)

    def batches(bs: list[list[Any]]) -> Any:
        for b in bs:
            if cfg.method == "kto":  # the answers and their KL partners in one forward: chunk(2) splits them
                yield {k: v.to(acc.device) for k, v in collate_sequences(
                    [x.example for x in b] + [x.kl for x in b], pad, cfg.data.packing, cfg.data.max_length).items()}
            else:
                yield collate(cfg, b, pad, acc.device, st.share)

    if hasattr(s.loss_model, "unshard"):  # FSDP2: calling the inner model bypasses the root's gather hook
        s.loss_model.unshard()
    with low_precision(s.model, acc.device.type, root.autocast_dtype):
        st.ref = precompute_reference_logps(s.model, batches(s.batches), s.cfg.train.loss_chunk_size, not full)
        st.val_ref = precompute_reference_logps(s.model, batches(s.val_batches), s.cfg.train.loss_chunk_size,
                                                not full)
    if hasattr(s.loss_model, "reshard"):
        s.loss_model.reshard()
    if full and acc.is_main_process:
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save((st.ref, st.val_ref), saved)
    return st


@torch.no_grad()
def check_logps(s: Any, rtol: float) -> None:
    """The step-0 checks, on one pair / answer / sample of the first micro-batch: the fused head's token log-probs
    against the model's whole forward (`train.fused_loss`; `loss.check_loss` for SFT), and the shared prompt's
    per-sequence log-probs against the sequences forwarded whole (`data.share_prompt`)."""
    cfg, pad, dev = s.cfg, s.tokenizer.pad_token_id, s.accelerator.device
    first = s.batches[s.plan[0][0]][:1]
    share = can_share(cfg, s.model)
    if cfg.method == "grpo":
        from .grpo import probe_inputs

        def inputs_for(shared: bool) -> dict[str, Any]:
            return probe_inputs(s, first[0], shared)
    else:
        def inputs_for(shared: bool) -> dict[str, Any]:
            return collate(cfg, first, pad, dev, shared)
    inputs = inputs_for(share)
    was = s.loss_model.training
    s.loss_model.eval()
    mode = "fused" if cfg.train.fused_loss else "plain"
    lp = s.loss_model(**_forward_inputs(inputs), mode=mode).double()
    ours = float(lp.mean())
    theirs = float(s.loss_model(**_forward_inputs(inputs), mode="plain").double().mean()) if mode == "fused" else ours
    if math.isfinite(theirs) and not abs(ours - theirs) <= rtol * max(1.0, abs(theirs)):
        raise ConfigError(
            f"{cfg.base_model}: tunesmith's fused log-probs on the first batch average {ours:.5f} per token but the "
            f"model's own forward gives {theirs:.5f}. This architecture changes its logits in a way the fused head "
            "does not reproduce, so training would optimise the wrong loss. Set train.fused_loss=false to train "
            "through the model's own forward (exact, more memory), and please report the model.")
    if share:  # the shared prompt must give each sequence the log-probs it has forwarded alone
        whole = inputs_for(False)
        got = sum_by_sequence(lp, inputs)
        want = sum_by_sequence(s.loss_model(**_forward_inputs(whole), mode=mode).double(), whole)
        if not torch.allclose(got, want, rtol=rtol, atol=rtol):
            raise ConfigError(
                f"{cfg.base_model}: with the prompt shared (data.share_prompt) the first batch's sequences get "
                f"log-probs {got.tolist()} but forwarded whole {want.tolist()}: this model does not read the 4D "
                "attention mask the sharing needs. Set data.share_prompt=false, and please report the model.")
    s.loss_model.train(was)


def _forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in ("input_ids", "targets", "sequence", "n_seqs", "attention_mask", "position_ids")
            if k in batch}


# -- eval ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(s: Any) -> dict[str, float]:
    """`eval_loss` (the method's loss on the validation data) and, for pair methods, `eval_preference_accuracy`:
    the share of pairs whose chosen answer gets the higher reward, by the method's own reward (DPO: the log-ratio
    to the reference; ORPO / SimPO: the mean log-prob per token), i.e. `preference.count_preferred`'s ranking read
    from the same forward. GRPO: `eval_reward_mean` from greedy answers (`grpo.evaluate`)."""
    cfg, acc, st = s.cfg, s.accelerator, s.method
    if cfg.method == "grpo":
        from .grpo import evaluate as grpo_evaluate

        return grpo_evaluate(s)
    s.loss_model.eval()
    tot = torch.zeros(3, device=acc.device, dtype=torch.float64)
    nll_weight = _orpo_weight(s.val_batches) if cfg.method == "orpo" else 1.0
    pad = s.tokenizer.pad_token_id
    for k in range(acc.process_index, len(s.val_batches), acc.num_processes):
        batch = s.val_batches[k]
        inputs = collate(cfg, batch, pad, acc.device, st.share)
        ref = st.val_ref[k].to(acc.device) if st.val_ref is not None else None
        if cfg.method == "kto":
            ref_main, ref_kl = ref.chunk(2) if ref is not None else (None, None)
            kl = s.loss_model(**_kl_inputs(cfg, batch, pad, acc.device), ref=ref_kl, mode="kl")
            inputs["kl_estimate"], ref = kl.clamp(min=0), ref_main  # per batch, this rank's: eval needs no collective
        loss, metrics, n = s.loss_model(**inputs, **({"ref": ref} if ref is not None else {}), nll_weight=nll_weight)
        tot[0] += loss.double()
        tot[1] += n
        tot[2] += float(metrics.get("reward_accuracy", torch.tensor(0.0))) * n
    tot = acc.reduce(tot, reduction="sum")
    s.loss_model.train()
    out = {"eval_loss": round(float(tot[0] / tot[1].clamp(min=1)), 5)}
    if cfg.method in PAIR_METHODS:
        out["eval_preference_accuracy"] = round(float(tot[2] / tot[1].clamp(min=1)), 5)
    return out
