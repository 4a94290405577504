"""`tunesmith train --dry-run`: check config and data, then time two real steps to predict time and memory.

Measuring beats formulas: two steps of the real model on the real batches give seconds per step and peak memory
(including the allocator's overhead) that a formula would only guess.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from .config import Config
from .data import examples_in
from .methods import MetricSums, prepare, step_units


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dry_run(cfg: Config, steps: int = 2) -> str:
    from .trainer import setup

    s = setup(cfg, check_output=False)
    acc, t = s.accelerator, cfg.train
    n_train = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in s.model.parameters())
    times = []
    for step in range(min(steps, len(s.plan))):
        t0 = time.time()
        group = [s.batches[i] for i in s.plan[step]]
        n_targets = (sum(ex.n_targets for b in group for ex in examples_in(b)) if cfg.method == "sft"
                     else step_units(cfg, group))  # pairs / answers / completions (finetune/methods.py)
        for j, i in enumerate(s.plan[step][acc.process_index:: acc.num_processes]):
            out = s.loss_model(**prepare(s, i, step, j, group).inputs)
            (MetricSums().add(out, {}) / n_targets).backward()  # the loss of SFT's or a method's output
        s.optimizer.zero_grad(set_to_none=True)  # no optimizer step: the dry run must not change anything
        times.append(time.time() - t0)
    per_step = times[-1]
    # the dry run takes no optimizer step, so AdamW's two fp32 moments per trained weight are not allocated yet:
    # added here (for a full fine-tune of the 135M model that is 1.1 GB of the peak)
    adam = 8 * n_train
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + adam
    if torch.cuda.is_available():
        peak_gpu = torch.cuda.max_memory_allocated() + adam
    avail = _available_bytes()
    total_steps = len(s.plan)
    lines = [
        f"model         {cfg.base_model}: {n_all / 1e6:,.1f} M parameters, {n_train / 1e6:,.2f} M trainable "
        f"({'full fine-tuning' if cfg.finetuning_type == 'full' else 'LoRA'})",
        f"data          {'; '.join(s.report.lines())}",
        f"steps         {total_steps} optimizer steps x {t.grad_accum} micro-batches, {len(s.val_batches)} eval batches",
        f"time          {per_step:.2f} s/step measured -> about {per_step * total_steps / 60:.1f} min for the run"
        + (f" (+ the first step's {times[0]:.0f} s, torch.compile)" if s.compiled and len(times) > 1 else ""),
        f"memory (RAM)  peak {peak / 2**30:.2f} GiB (measured, + {adam / 2**20:,.2f} MiB AdamW state)"
        + (f", {avail / 2**30:.1f} GiB available now" if avail else ""),
    ]
    if torch.cuda.is_available():
        lines.append(f"memory (GPU)  peak {peak_gpu / 2**30:.2f} GiB of {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    if avail and peak > 0.9 * avail:
        lines.append("WARNING: peak memory is close to what is available: lower train.micro_batch_size or "
                     "data.max_length, or set train.gradient_checkpointing=true.")
    return "\n".join(lines)
