"""Supervised fine-tuning (LoRA or full) on Accelerate: `setup` builds everything, `fit` is the loop, read top to bottom.

The same code runs on one CPU, under `accelerate launch` with several CPU (gloo) or GPU processes, and resumes
exactly: the data order is a pure function of (seed, step), and checkpoints carry optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from . import compiling, methods, tracking  # methods: dpo, orpo, simpo, kto, grpo
from .config import Config, ConfigError, save_config
from .data import (
    DataReport,
    Example,
    build_examples,
    collate,
    examples_in,
    load_records,
    micro_batches,
    packed_shape,
    prompts_and_answers,
    split_validation,
)
from .errors import TrainingError
from .loss import LossModel, _causal, check_loss
from .metrics import resolve_labels
from .model import base_fingerprint, load_base_model, load_tokenizer, pick_dtype, resolve_base_model
from .runs import (
    Smoothed,
    append_metrics,
    atomic_dir,
    check_same_config,
    check_same_schedule,
    full_state,
    latest_checkpoint,
    load_checkpoint,
    plot_losses,
    prune_checkpoints,
    save_adapter,
    save_checkpoint,
    save_full_model,
    trim_metrics,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class Setup:
    cfg: Config
    accelerator: Any
    tokenizer: Any
    model: Any
    """The PEFT model (LoRA) or the whole causal LM (full fine-tuning): what gets saved."""
    loss_model: Any
    """LossModel after accelerator.prepare (DDP-wrapped when several processes)."""
    optimizer: Any
    scheduler: Any
    plan: list[list[int]]
    """plan[step] = indices into `batches` that step uses (all ranks); data order is fixed up front."""
    batches: list[list[Example]]
    val_batches: list[list[Example]]
    report: DataReport
    out: Path
    scaler: Any = None
    """torch.amp.GradScaler for fp16 (loss scaling keeps small gradients from flushing to zero), else None."""
    labels: list[str] | None = None
    """The label set when the answers are classes (`data.labels`): evals then also log `eval_accuracy`."""
    val_prompts: list[Any] | None = None
    val_answers: list[str] | None = None
    method: Any = None
    """methods.MethodState for dpo/orpo/simpo/kto/grpo: precomputed reference, rewards, the Generator."""
    pad: dict[str, int] = field(default_factory=dict)
    """Extra padding of training batches when the layers are compiled (compiling.bucket): few shapes, few compiles."""
    compiled: bool = False
    """The decoder layers are compiled (`train.compile`; finetune/compiling.py)."""
    row_width: int = 0
    """Packed SFT rows' width (`data.row_width`), 0 when not packed."""

    def inputs(self, batch: list[Any], train: bool = False) -> dict[str, torch.Tensor]:
        """A micro-batch as LossModel keyword tensors on this process's device."""
        t = collate(batch, self.cfg.data.packing, self.tokenizer.pad_token_id, **(self.pad if train else {}))
        return {k: v.to(self.accelerator.device) for k, v in t.items()}


def setup(cfg: Config, resume: bool = False, check_output: bool = True, accelerator: Any = None) -> Setup:
    """Everything the loop needs. `accelerator`: your own `accelerate.Accelerator` (default: one from the
    `accelerate launch` config, or a single process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from peft import LoraConfig, get_peft_model

    trackers = tracking.accelerator_kwargs(cfg)  # train.report_to's packages are checked before anything loads
    acc = accelerator or Accelerator(**trackers)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported by tunesmith's loop yet (its engine steps the optimizer inside backward and "
            "shards what the loop saves; untested setups are refused rather than trained wrong). Use FSDP2 "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml) to shard a model over several GPUs.")
    if cfg.method == "grpo" and acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("method grpo under FSDP is not supported yet (sampling from sharded weights is untested). "
                          "Run GRPO on one process or under DDP (accelerate launch --multi_gpu).")
    out = Path(cfg.output_dir)
    finished = (out / "adapter").exists() or (out / "model").exists()
    if check_output and not resume and (finished or latest_checkpoint(out) is not None):
        what = "a finished run" if finished else "checkpoints of an unfinished run"
        raise FileExistsError(f"{out} already holds {what}. Pass --resume to continue it, or set output_dir to a "
                              f"new folder (e.g. output_dir={out}-2).")
    _seed_everything(cfg.seed)
    if acc.device.type == "cpu" and compiling.why_not(cfg, acc.device, acc.num_processes) is None:
        compiling.start_cpu_probe()  # while the data and the model load (a compiled first step waits for it)
    tok = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if cfg.data.chat_template:
        from .data import resolve_chat_template

        tok.chat_template = resolve_chat_template(tok, cfg.data.chat_template)

    # 1) data: read and check everything before the (slow) model load, so a bad record fails in seconds
    if not cfg.data.train:
        raise ConfigError("data.train is empty: list at least one training file in the config.")
    train_recs = load_records(cfg.data.train)
    if cfg.data.validation:
        val_recs = load_records(cfg.data.validation)
    else:
        train_recs, val_recs = split_validation(train_recs, cfg.data.val_set_size, cfg.seed)
    report = DataReport()
    t = cfg.train
    methods.check_data_kind(cfg.method, train_recs[0])  # SFT given preference pairs: say `method: dpo`
    labels, val_prompts, val_answers = None, cast("list[Any]", []), cast("list[str]", [])
    width, rows = cfg.data.max_length, t.micro_batch_size  # packed SFT rows: data.packed_shape
    base_config = _base_config(cfg)
    if cfg.method == "sft":
        train_ex = build_examples(train_recs, tok, cfg.data, report)
        val_ex = build_examples(val_recs, tok, cfg.data, DataReport())
        if not train_ex:
            raise ConfigError(f"{cfg.data.train}: no usable training examples. " + "; ".join(report.lines()))
        labels = resolve_labels(cfg.data.labels, prompts_and_answers(train_recs, cfg.data)[1])
        val_prompts, val_answers = prompts_and_answers(val_recs, cfg.data) if labels else ([], [])
        if cfg.data.packing:
            width, rows = packed_shape(train_ex + val_ex, t.micro_batch_size, width, cfg.data.row_width,
                                       _hidden_size(base_config))
        batches = micro_batches(train_ex, rows, width, cfg.data.packing, seed=cfg.seed)
        val_batches = micro_batches(val_ex, rows, width, cfg.data.packing)
        if cfg.data.packing:
            n_rows = sum(len(b) for b in batches)
            report.packing = (f"packed into {n_rows} rows of {width} tokens ({report.tokens / (n_rows * width):.0%} "
                              f"filled), {rows} per micro-batch (data.row_width={cfg.data.row_width})")
    else:  # preference pairs, KTO answers or GRPO prompts (finetune/methods.py)
        batches, val_batches = methods.build_batches(cfg, tok, train_recs, val_recs, report)
    _check_max_length(cfg, base_config)

    # 2) the plan: which micro-batches each optimizer step uses, for every rank, reshuffled each epoch
    per_step = t.grad_accum * acc.num_processes
    steps_per_epoch = max(1, math.ceil(len(batches) / per_step))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(steps_per_epoch * t.epochs))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        order = list(range(len(batches)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        order += order[: (-len(order)) % per_step]  # wrap so every rank gets the same number of micro-batches
        plan += [order[i: i + per_step] for i in range(0, len(order), per_step)]
        epoch += 1
    plan = plan[:total]

    # 3) model. LoRA: frozen base in the compute dtype, LoRA weights in fp32. Full: fp32 master weights (bf16 weights
    #    would round away most AdamW updates), computed in the low precision under autocast. QLoRA: the 4-bit base
    #    as loaded, like LoRA's; not peft's prepare_model_for_kbit_training, which casts every 16-bit weight left
    #    (embeddings, output head, norms) to fp32: +2.2 GB on Qwen2.5-7B's shape and an fp32 output head (TRL and
    #    unsloth train it in bf16 too)
    dtype = pick_dtype(t.precision, acc.device)
    full = cfg.finetuning_type == "full"
    model: PreTrainedModel | PeftModel = load_base_model(
        cfg.base_model, dtype=torch.float32 if full else dtype, device=acc.device, load_in_4bit=cfg.lora.load_in_4bit,
        trust_remote_code=cfg.trust_remote_code)
    if full:
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not full:
        targets = "all-linear" if cfg.lora.target_modules == "auto" else cfg.lora.target_modules
        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, use_dora=cfg.lora.use_dora, use_rslora=cfg.lora.use_rslora,
                          task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as e:
            raise ConfigError(f"lora.target_modules={cfg.lora.target_modules}: {e}. Use `auto` or names of linear "
                             f"layers such as {_linear_names(model)}.") from None
        if t.fused_lora:
            from .fused_lora import use_fused_lora  # imports peft, as this function does

            use_fused_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # torch's fused AdamW (one kernel for all tensors; HF Trainer's default on GPUs): on a CPU the default loop over
    # the embedded model's 420 LoRA tensors took 24 ms a step, fused 4 ms (the same update to ~1e-8: 1.04x a
    # quickstart step). FSDP keeps the default (its sharded parameters are untested with it here)
    from accelerate.utils import DistributedType

    fused = acc.device.type in ("cpu", "cuda") and acc.distributed_type != DistributedType.FSDP
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.999),
                            fused=fused or None)
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps >= 0 else int(round(t.warmup_ratio * total))
    name = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    n_params = sum(p.numel() for p in model.parameters())
    pad: dict[str, int] = {}
    if (why := compiling.why_not(cfg, acc.device, acc.num_processes, n_params, total)) is None:
        n = compiling.compile_layers(_causal(model), width)
        if t.fused_lora:
            from .fused_lora import stack_groups, use_fused_swiglu

            stack_groups(model)  # the grouped siblings' base weights stacked once, not in every compiled forward
            use_fused_swiglu(model)  # SwiGLU's silu(gate) * up as one C++ op on CPUs with AVX-512 (finetune/cpuops.py)
        if cfg.method == "sft":
            pad = compiling.bucket(cfg.data.packing, width, rows)
        acc.print(f"train.compile={t.compile}: {n} decoder layers compiled by torch.compile; the first step compiles "
                  f"them (20-40 s on 2 CPU cores, seconds once cached), then steps run faster")
    else:
        acc.print(why)
    module = (LossModel(model, t.loss_chunk_size, autocast_dtype=low, fused=t.fused_loss) if cfg.method == "sft"
              else methods.PreferenceModel(model, t.loss_chunk_size, low, t.fused_loss, cfg))
    loss_model, opt = acc.prepare(module, opt)
    # fp16 needs loss scaling. torch's GradScaler is what Accelerate builds for fp16 on GPUs; used directly so the
    # same path also runs (and is tested) on CPU, where Accelerate 1.x creates none
    scaler = torch.amp.GradScaler(acc.device.type) if dtype == torch.float16 else None
    s = Setup(cfg, acc, tok, model, loss_model, opt, sched, plan, batches, val_batches, report, out, scaler, labels,
              val_prompts, val_answers, pad=pad, compiled=why is None,
              row_width=width if cfg.method == "sft" and cfg.data.packing else 0)
    # 4) before any step: our loss must be the model's own (one row of the first micro-batch keeps memory small)
    if t.fused_loss or cfg.method != "sft":  # preference methods: also the shared prompt (data.share_prompt)
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
        with compiling.eager():
            if cfg.method == "sft":
                check_loss(loss_model, s.inputs(batches[plan[0][0]][:1]), cfg.base_model, rtol=rtol)
            else:
                methods.check_logps(s, rtol)
        if hasattr(loss_model, "reshard"):  # FSDP2 leaves the root's parameters gathered after a forward
            loss_model.reshard()
    if cfg.method != "sft":  # rewards and Generator (GRPO), precomputed reference log-probs (precompute_ref)
        s.method = methods.prepare_state(s, resume)
    return s


OnEval = Callable[[int, dict[str, float]], None]
"""Called on the main process after each validation eval with (step, {"eval_loss", ["eval_accuracy"]}); an
exception it raises (a sweep's `optuna.TrialPruned`) stops training there."""


def fit(s: Setup, resume: bool = False, on_eval: OnEval | None = None) -> dict[str, Any]:
    """Train. Returns the summary also written to `summary.json`.

    SIGTERM / Ctrl-C ask for a checkpoint and a clean exit; the previous handlers are back once this returns, so a
    notebook or the UI that called it still gets its Ctrl-C."""
    if s.compiled:
        compiling.room_for_graphs()  # this thread may not be the one `setup` compiled the layers in
    with _stop_on_signal() as stop_requested, tracking.ending(s.accelerator, s.cfg):
        return _loop(s, resume, stop_requested, on_eval)


def _loop(s: Setup, resume: bool, stop_requested: Callable[[], bool], on_eval: OnEval | None) -> dict[str, Any]:
    """The training loop, read top to bottom."""
    from tqdm.auto import tqdm

    cfg, acc, t = s.cfg, s.accelerator, s.cfg.train
    rank, world = acc.process_index, acc.num_processes
    out = s.out
    total = len(s.plan)
    start = 0
    if resume and (ck := latest_checkpoint(out)) is not None:
        check_same_config(cfg, out / "config.yaml")
        check_same_schedule(ck, total, world, cfg)
        start = load_checkpoint(ck, s.loss_model, s.optimizer.optimizer, s.scheduler, s.scaler)
        acc.print(f"resumed from {ck} (step {start})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        tracking.start(acc, cfg, out, start)  # before the trim: rows past `start` are steps the trackers hold
        trim_metrics(out / "metrics.jsonl", start)
        for line in s.report.lines():
            acc.print(line)
    bar = tqdm(total=total, initial=start, disable=not acc.is_main_process, desc="train", dynamic_ncols=True)
    t0, tokens_seen, last, skipped_in_a_row, skipped = time.time(), 0, {}, 0, 0
    smooth = Smoothed(total)
    metrics: dict[str, float | None] = {}  # the step's reward margins, rewards, ... (methods other than sft)
    s.loss_model.train()
    for step in range(start, total):
        group = [s.batches[i] for i in s.plan[step]]
        # 1) normalise by the trained tokens of the whole step (all ranks, all micro-batches), so grad accumulation
        #    and multi-process give exactly the gradient of one big batch; DDP averages, hence the * world. Other
        #    methods: by the step's pairs / answers / completions (their loss modules return sums over those)
        n_targets = (sum(ex.n_targets for b in group for ex in examples_in(b)) if cfg.method == "sft"
                     else methods.step_units(cfg, group))
        mine = s.plan[step][rank::world]
        step_loss = torch.zeros((), device=acc.device)
        step_metrics = methods.MetricSums()  # reward margins, accuracies, log-probs (preference); rewards (GRPO)
        for j, i in enumerate(mine):
            micro = methods.prepare(s, i, step, j, group)  # SFT: s.inputs; DPO...: + reference, KL; GRPO: samples
            sync = j == len(mine) - 1
            with acc.no_sync(s.loss_model) if not sync else contextlib.nullcontext():
                loss_sum = step_metrics.add(s.loss_model(**micro.inputs), micro.metrics)
                scaled = loss_sum * world / n_targets
                acc.backward(s.scaler.scale(scaled) if s.scaler else scaled)
            step_loss += loss_sum.detach()
            tokens_seen += micro.tokens
        loss = acc.reduce(step_loss, reduction="sum").item() / n_targets
        metrics = step_metrics.reduce(acc)
        if not math.isfinite(loss):  # every rank sees the same reduced value, so all stop together
            raise TrainingError(_diverged(step + 1, loss, t, fp16=s.scaler is not None))
        # 2) clip, step (fp16: skipped when the scaled gradients overflowed, and the scale lowered), schedule
        if s.scaler:
            s.scaler.unscale_(s.optimizer)
        grad_norm = acc.clip_grad_norm_(s.model.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 else None
        if s.scaler:
            scale = s.scaler.get_scale()
            s.scaler.step(s.optimizer)
            s.scaler.update()
            skipped_in_a_row = skipped_in_a_row + 1 if s.scaler.get_scale() < scale else 0
            skipped += skipped_in_a_row > 0
            if skipped_in_a_row >= _MAX_SKIPPED:
                raise TrainingError(_diverged(step + 1, loss, t, fp16=True, skipped=skipped_in_a_row))
        else:
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        # 3) log, evaluate, checkpoint
        elapsed = time.time() - t0
        tps = tokens_seen * world / max(elapsed, 1e-9)
        loss_smooth = smooth.add(loss)
        last = {"step": step + 1, "loss": round(loss, 5), "lr": s.scheduler.get_last_lr()[0],
                "grad_norm": round(float(grad_norm), 5) if grad_norm is not None and math.isfinite(grad_norm) else None,
                methods.UNITS[cfg.method]: n_targets, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 2),
                **metrics}
        if skipped_in_a_row:
            last["skipped"] = True  # fp16 overflow: this step changed no weights
        if t.eval_every > 0 and (step + 1) % t.eval_every == 0 and s.val_batches and step + 1 < total:
            last.update(evaluate(s))
        evaluated = any(k.startswith("eval_") for k in last)
        if acc.is_main_process and ((step + 1) % t.log_every == 0 or evaluated):
            append_metrics(out / "metrics.jsonl", last)
            tracking.log(acc, last)
        if on_eval is not None and evaluated and acc.is_main_process:
            on_eval(step + 1, {k: v for k, v in last.items() if k.startswith("eval_")})
        bar.set_postfix(loss=f"{loss_smooth:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        stop = _any_rank(acc, stop_requested())  # a signal seen by one rank stops all of them at the same step
        if (t.save_every > 0 and (step + 1) % t.save_every == 0 and step + 1 < total) or stop:
            _checkpoint(s, step + 1)
            if stop:
                acc.print(f"\nstopped at step {step + 1}; checkpoint saved. Continue with --resume.")
                bar.close()
                raise SystemExit(143)
    bar.close()
    # 4) final eval and the run folder: adapter, tokenizer + template, metrics, loss curve, summary
    summary = {"steps": total, "final_loss": last.get("loss"), "train_tokens_per_s": last.get("tokens_per_s"),
               "train_time_s": round(time.time() - t0, 1), "data": s.report.lines(), "world_size": world,
               "dtype": str(next(s.model.parameters()).dtype), "method": cfg.method, **metrics}
    if s.scaler:
        summary["fp16_skipped_steps"] = skipped
    if s.val_batches:
        final_eval = evaluate(s)
        summary.update(final_eval)
        if cfg.method == "sft":
            summary["eval_ppl"] = round(math.exp(min(summary["eval_loss"], 50)), 3)
        if acc.is_main_process:
            append_metrics(out / "metrics.jsonl", {"step": total, **final_eval})
            tracking.log(acc, {"step": total, **final_eval})
            if on_eval is not None:
                on_eval(total, final_eval)
    weights, _ = full_state(s.loss_model, _trainable(s))  # every rank: under FSDP each holds only a shard
    if acc.is_main_process:
        if cfg.finetuning_type == "full":
            with atomic_dir(out / "model") as tmp:
                save_full_model(s.model, weights, tmp, dtype=pick_dtype(t.precision, acc.device))
                (tmp / "tunesmith_base.json").write_text(json.dumps(_base_meta(cfg)))
        else:
            with atomic_dir(out / "adapter") as tmp:
                save_adapter(s.model, weights, tmp)
                (tmp / "tunesmith_base.json").write_text(json.dumps(_base_meta(cfg)))
        with atomic_dir(out / "tokenizer") as tmp:
            s.tokenizer.save_pretrained(tmp)
        (out / "chat_template.jinja").write_text(s.tokenizer.chat_template or "")
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tracking.log_files(acc, out, total)
        acc.print(f"done: {out} (loss {summary['final_loss']}, eval {summary.get('eval_loss')}, "
                  f"{summary['train_tokens_per_s']} tok/s, {summary['train_time_s']} s)")
    acc.wait_for_everyone()
    return summary


def evaluate(s: Setup) -> dict[str, float]:
    """Validation loss and, when the answers are labels, accuracy of the best-scoring label (`eval_accuracy`).
    Other methods: `methods.evaluate` (their loss, `eval_preference_accuracy`, GRPO's `eval_reward_mean`).
    Compiled layers run uncompiled here: no inference graphs to compile per shape."""
    with compiling.eager():
        return _evaluate(s)


def _evaluate(s: Setup) -> dict[str, float]:
    if s.cfg.method != "sft":
        return methods.evaluate(s)
    res = {"eval_loss": evaluate_loss(s)}
    if s.labels and s.val_prompts:
        from .evaluate import label_accuracy

        res["eval_accuracy"] = label_accuracy(s)
    return res


@torch.no_grad()
def evaluate_loss(s: Setup) -> float:
    """Mean loss per trained token over the validation batches (sharded across ranks)."""
    acc = s.accelerator
    s.loss_model.eval()
    tot = torch.zeros(2, device=acc.device, dtype=torch.float64)
    for batch in s.val_batches[acc.process_index:: acc.num_processes]:
        tot[0] += s.loss_model(**s.inputs(batch)).double()
        tot[1] += sum(ex.n_targets for ex in examples_in(batch))
    tot = acc.reduce(tot, reduction="sum")
    s.loss_model.train()
    return round(float(tot[0] / tot[1].clamp(min=1)), 5)


def train(cfg: Config, resume: bool = False, on_eval: OnEval | None = None) -> dict[str, Any]:
    """Python API: fine-tune as configured and return the summary (the run folder is `cfg.output_dir`)."""
    return fit(setup(cfg, resume=resume), resume=resume, on_eval=on_eval)


# -- helpers ---------------------------------------------------------------------------------------------------
def _checkpoint(s: Setup, step: int) -> None:
    weights, optim = full_state(s.loss_model, _trainable(s), s.optimizer.optimizer)  # every rank: FSDP gathers
    if s.accelerator.is_main_process:
        save_checkpoint(s.out, step, s.model, weights, optim, s.scheduler, s.scaler,
                        meta={"total_steps": len(s.plan), "world_size": s.accelerator.num_processes})
        prune_checkpoints(s.out, s.cfg.train.keep_checkpoints)
    s.accelerator.wait_for_everyone()


def _trainable(s: Setup) -> set[str]:
    """Names of the trained weights as the prepared LossModel calls them (what `full_state` keys by)."""
    return {f"peft_model.{n}" for n, p in s.model.named_parameters() if p.requires_grad}


def _base_meta(cfg: Config) -> dict[str, Any]:
    return {"base_model": cfg.base_model, "fingerprint": base_fingerprint(resolve_base_model(cfg.base_model)),
            "summary": f"{cfg.base_model}"}


def _base_config(cfg: Config) -> dict[str, Any]:
    """The base model's config.json ({} when there is none locally), read once for the checks before the model loads."""
    cfg_file = Path(resolve_base_model(cfg.base_model)) / "config.json"
    return json.loads(cfg_file.read_text()) if cfg_file.exists() else {}


def _check_max_length(cfg: Config, base_config: dict[str, Any]) -> None:
    limit = base_config.get("max_position_embeddings")
    if limit and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is over {cfg.base_model}'s limit of {limit} "
                         f"positions. Set data.max_length <= {limit}.")


def _hidden_size(base_config: dict[str, Any]) -> int:
    """The base model's hidden size (0 when unknown), for `data.packed_shape`'s cost model."""
    c = base_config.get("text_config") or base_config  # multimodal configs keep the language model's own
    return int(next((c[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(c.get(k), int)), 0))


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


@contextlib.contextmanager
def _stop_on_signal() -> Iterator[Callable[[], bool]]:
    """SIGTERM / Ctrl-C: finish the current step, save a checkpoint, exit. A second Ctrl-C stops at once.

    The previous handlers are restored on the way out, whatever happens inside."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    old: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (e.g. called from a UI worker): no handler, nothing breaks
        pass
    try:
        yield lambda: flag["stop"]
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _any_rank(acc: Any, flag: bool) -> bool:
    """True on every rank when it is true on one: ranks that disagree would hang, one in the checkpoint barrier and
    one in the next all-reduce."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


_MAX_SKIPPED = 25
"""fp16 steps skipped in a row before we stop: the loss scale starts at 2**16, so a few early skips are normal, and
25 in a row means the gradients overflow at a scale of 2**-9, i.e. no scale helps."""


def _diverged(step: int, loss: float, t: Any, fp16: bool, skipped: int = 0) -> str:
    if fp16:
        what = (f"{skipped} fp16 steps in a row had overflowing gradients" if skipped
                else f"the loss is {loss} at step {step}: fp16 overflowed (a value went past fp16's largest, 65504)")
        return (f"step {step}: {what}. Train with train.precision=bf16 (GPUs since Ampere, recent CPUs) or "
                "train.precision=fp32. The weights were not updated by the bad step; earlier checkpoints are intact.")
    return (f"step {step}: the loss is {loss} (not finite), so training diverged. Lower train.lr (now {t.lr}) and "
            "keep train.max_grad_norm > 0. The weights were not updated by the bad step.")
