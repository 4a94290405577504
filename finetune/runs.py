"""The run folder on disk: atomic writes, resumable checkpoints, and the loss curve.

A folder is written under a temporary name and renamed into place, so a run killed mid-save never leaves a
half-written adapter that loads; a checkpoint counts only once its `state.pt` is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, config_to_dict, flatten


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / "checkpoints"
    found = []
    for d in root.glob("step-*") if root.exists() else []:
        if (d / "state.pt").exists() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1][1] if found else None


def full_state(module: Any, names: set[str], optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable weights (those in `names`) and optimizer state, whole and on CPU, keyed by parameter name.

    torch's distributed-checkpoint helpers give the same result for one process, DDP and FSDP (where each rank holds
    only a shard): a collective there, so every rank must call it. Rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = {k: v for k, v in get_model_state_dict(module, options=opts).items() if k in names}
    optim = get_optimizer_state_dict(module, optimizer, options=opts) if optimizer is not None else {}
    return weights, optim


def save_adapter(peft_model: Any, weights: dict[str, Any], folder: Path, prefix: str = "peft_model.") -> None:
    """peft's own adapter folder, written from the gathered weights (never from a rank's shard)."""
    peft_model.save_pretrained(folder, state_dict={k.removeprefix(prefix): v for k, v in weights.items()})


def save_full_model(model: Any, weights: dict[str, Any], folder: Path, dtype: torch.dtype,
                    prefix: str = "peft_model.") -> None:
    """A full fine-tune as a plain transformers model folder (loads anywhere), from the gathered fp32 weights, stored
    in the compute dtype (what inference loads anyway; half the disk of fp32)."""
    state = {k.removeprefix(prefix): v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    trained_dtype, model.config.dtype = model.config.dtype, dtype  # config.json says what the files hold
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        model.config.dtype = trained_dtype


def save_checkpoint(out: Path, step: int, peft_model: Any, weights: dict[str, Any], optim: dict[str, Any],
                    scheduler: Any, scaler: Any = None, meta: dict[str, Any] | None = None) -> Path:
    """`weights`/`optim` come from `full_state`; `meta` (total steps, world size) goes to trainer_state.json, so a
    resume can refuse a changed schedule."""
    final = Path(out) / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        if hasattr(peft_model, "peft_config"):  # a loadable adapter per checkpoint (full fine-tunes: state.pt only)
            save_adapter(peft_model, weights, tmp / "adapter")
        state = {
            "step": step,
            "weights": weights,
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(meta or {})}))
    return final


def read_trainer_state(ck: Path) -> dict[str, Any]:
    f = Path(ck) / "trainer_state.json"
    return json.loads(f.read_text()) if f.exists() else {}


def load_checkpoint(ck: Path, module: Any, optimizer: Any, scheduler: Any, scaler: Any = None) -> int:
    """Restore trainable weights, optimizer, scheduler, fp16 loss scale and RNG into the prepared (DDP/FSDP) module;
    every rank calls it and reads the same file. Returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = torch.load(ck / "state.pt", weights_only=False)
    if "weights" not in state:
        raise FileNotFoundError(f"{ck} was written by an older tunesmith (no gathered weights in state.pt) and cannot "
                                "be resumed exactly. Start the run again with another output_dir.")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, state["weights"], options=opts)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=opts)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def prune_checkpoints(out: Path, keep: int) -> None:
    found = checkpoint_dirs(out)
    for _, d in found[: max(0, len(found) - keep)]:
        shutil.rmtree(d, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl. Text after the last newline is a row still being written (read beside a running
    trainer, or left by a run killed mid-write): it is not a row yet, and is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


class Smoothed:
    """The smoothed train loss of the progress bar and `loss.png`: a debiased exponential moving average (Adam's
    bias correction, TensorBoard's smoothing) over a window of ~5% of the run (2 to 50 steps).

    The old fixed 10-step average started at step 1's value and lagged far above every recent raw point on short
    runs (quickstart: the bar said 2.57 at the end while the last steps were ~1.8)."""

    def __init__(self, total_steps: int) -> None:
        window = min(50, max(2, total_steps // 20))
        self.beta = 1 - 1 / window
        self._avg, self._n = 0.0, 0

    def add(self, value: float) -> float:
        self._n += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        return self._avg / (1 - self.beta**self._n)


_REWARD_CURVES = ("reward_margin", "reward_accuracy", "eval_preference_accuracy", "reward_mean", "eval_reward_mean")
"""What preference tuning and GRPO add to `loss.png`, in a panel of its own (their scales are not the loss's)."""


def plot_losses(metrics: Path, png: Path) -> None:
    """Train loss (raw and smoothed) and eval loss against step: people would rather look than read JSONL.
    Preference and GRPO runs get a second panel: reward margin and accuracy, or mean reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    curves = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in _REWARD_CURVES}
    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4), dpi=110, squeeze=False)
    ax = axes[0, 0]
    if tr:
        xs, ys = zip(*tr)
        ax.plot(xs, ys, color="#9ecae1", lw=1, label="train loss")
        smooth = Smoothed(xs[-1])
        ax.plot(xs, [smooth.add(y) for y in ys], color="#08519c", lw=2, label="train loss (smoothed)")
    if ev:
        xs, ys = zip(*ev)
        ax.plot(xs, ys, "o-", color="#e6550d", lw=2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per pair / answer / completion" if curves else "loss per trained token")
    ax.set_title(Path(metrics).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if curves:
        rx = axes[0, 1]
        for k, pts in curves.items():
            xs, ys = zip(*pts)
            rx.plot(xs, ys, "o-" if k.startswith("eval_") else "-", lw=1.5, label=k.replace("_", " "))
        rx.set_xlabel("optimizer step")
        rx.set_title("rewards")
        rx.grid(alpha=0.3)
        rx.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


_RESUME_FREE = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every",
                "train.keep_checkpoints", "train.report_to"}
"""Keys that may change between a run and its resume; anything else would silently train a different run."""


def check_same_config(cfg: Config, saved: Path) -> None:
    if not saved.exists():
        return
    import yaml

    old, new = flatten(yaml.safe_load(saved.read_text()) or {}), flatten(config_to_dict(cfg))
    changed = sorted(k for k in new if k not in _RESUME_FREE and old.get(k, new[k]) != new[k])
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(f"--resume with a config that differs from {saved} ({diffs}). Resume with the same "
                          "settings, or start a new run with another output_dir.")


def check_same_schedule(ck: Path, total: int, world: int, cfg: Config) -> None:
    """The LR schedule (warmup, decay) and the data plan are laid out over the total steps and the number of
    processes: resuming with either changed would silently train a different run than the one checkpointed."""
    meta = read_trainer_state(ck)
    old_total, old_world = meta.get("total_steps", total), meta.get("world_size", world)
    if old_total != total:
        t = cfg.train
        raise ConfigError(
            f"--resume: {ck} belongs to a run of {old_total} optimizer steps, but this config gives {total} "
            f"(train.max_steps={t.max_steps}, train.epochs={t.epochs}). The learning-rate schedule is laid out over "
            f"the total, so changing it would silently change the run. Resume with the run's own train.max_steps / "
            f"train.epochs (see {ck.parents[1] / 'config.yaml'}), or start a new run with another output_dir.")
    if old_world != world:
        raise ConfigError(
            f"--resume: {ck} was trained on {old_world} processes, this launch has {world}. Each step's data is split "
            f"across processes, so resume with {old_world} processes (accelerate launch --num_processes "
            f"{old_world}), or start a new run with another output_dir.")


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(path: Path, start: int) -> None:
    """On resume, drop metric rows past the checkpoint so the log matches an uninterrupted run."""
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= start))
