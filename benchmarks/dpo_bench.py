"""LoRA DPO: tunesmith (`method: dpo`) vs TRL `DPOTrainer` + peft, on the same pairs in the same order, same steps.

    python benchmarks/dpo_bench.py                      # embedded SmolLM2-135M-Instruct, 20 steps of 8 pairs
    python benchmarks/dpo_bench.py --seeds 1,2,3        # final loss mean +- sd over seeds, speed the best seed
    python benchmarks/dpo_bench.py --tiny               # seconds, tiny random model (CI smoke run)

Both trainers get: the base model as tunesmith loads it (`load_base_model`, bf16), LoRA r/alpha on all linear
layers (dropout 0), beta and the sigmoid loss, the reference = the same weights with the adapter off (TRL does that
itself for a peft model with `ref_model=None`), AdamW lr with cosine decay after the same warmup steps, grad-norm
clip 1.0, `--batch` pairs per optimizer step (no accumulation), `max_length`, no eval, no checkpoints. tunesmith runs
first (configs/smollm2-135m_dpo.yaml with overrides, `setup` + `fit`, which is what `train` runs); its plan says
which pairs each step trains on, and TRL is given exactly those pairs in that order (`train_sampling_strategy=
"sequential"`), so the per-step losses compare the same data. The training file is cut to whole micro-batches.

Measured per trainer, each in its own subprocess:
- wall s: the optimizer steps, from the start of the loop (tunesmith: `fit`'s clock; TRL: `on_train_begin`) to the
  end of the last step; model load, tokenization, tunesmith's step-0 log-prob check and saving are excluded;
- tokens: prompt+chosen and prompt+rejected (the two sequences of each pair), counted once by tunesmith's
  tokenization of the pairs trained; the same pairs, so the same count for every trainer; pairs/s and tokens/s
  from it. "tokens forwarded" is what each one ran through the model: tunesmith forwards a pair's prompt once by
  default (`data.share_prompt`), `tunesmith-whole` is the same run with it off, TRL's count includes its padding;
- peak RSS: VmHWM of the worker at the end of training (model load included); peak GPU MB on CUDA;
- the loss of every step (each trainer's own number, the mean over the step's pairs).

What differs: TRL marks everything after the prompt as completion, so it also trains the "\\n" after `<|im_end|>`
(one token per side that both forward and tunesmith does not train; TRL's own token count is in the note); TRL pads
chosen and rejected to the longest sequence of the batch, tunesmith packs them into rows (`data.packing: true`, its
default for DPO) and shares their prompt; TRL computes its extra metrics (entropy, logit means, token accuracy)
every step, as a TRL user has them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from chat_bench import _ratio, _table
from train_bench import _peak_rss_mb, run_worker

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-135m_dpo.yaml"
PAIRS = ROOT / "examples" / "data" / "pairs_train.jsonl"
TRAINERS = ("tunesmith", "tunesmith-whole", "trl")


# -- workers: one training run in this process -------------------------------------------------------------------
def _run_tunesmith(a: argparse.Namespace, out: Path, share: bool = True) -> dict:
    from tunesmith.finetune import load_config
    from tunesmith.finetune.pairs import shared_length
    from tunesmith.finetune.trainer import fit, setup  # `train` is fit(setup(cfg)); the plan in between names the pairs

    cfg = load_config(CONFIG, [
        f"base_model={a.model}", f"output_dir={out}", f"data.train=[{a.train}]", "data.validation=[]",
        "data.val_set_size=0", f"data.max_length={a.max_length}", f"seed={a.seed}", f"train.max_steps={a.steps}",
        f"train.micro_batch_size={a.batch}", "train.grad_accum=1", "train.eval_every=0", "train.save_every=0",
        "train.precision=bf16", f"train.lr={a.lr}", "train.scheduler=cosine", f"train.warmup_steps={a.warmup}",
        f"lora.r={a.r}", f"lora.alpha={a.alpha}", "lora.dropout=0", "lora.target_modules=auto", f"dpo.beta={a.beta}",
        "dpo.loss_type=sigmoid", "dpo.precompute_ref=false", f"data.share_prompt={share}"])
    s = setup(cfg)
    steps = [[pair for i in plan for pair in s.batches[i]] for plan in s.plan]
    order = [[int(pair.where.rsplit(":", 1)[1]) for pair in step] for step in steps]  # file lines, 1-based
    tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for step in steps for p in step)
    forwarded = tokens - sum(shared_length([p.chosen, p.rejected]) for step in steps for p in step) * s.method.share
    fit(s)
    rss = _peak_rss_mb()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"order": order, "pairs": sum(map(len, order)), "tokens": tokens, "forwarded": forwarded,
            "seconds": rows[-1]["elapsed_s"],
            "losses": [r["loss"] for r in rows], "peak_rss_mb": rss}


def _conversation(rec: dict) -> dict:
    """A pairs record in TRL's conversational form: string prompts and answers become one user / assistant turn."""
    def turns(v: str | list, role: str) -> list:
        return [{"role": role, "content": v}] if isinstance(v, str) else v

    return {"prompt": turns(rec["prompt"], "user"), "chosen": turns(rec["chosen"], "assistant"),
            "rejected": turns(rec["rejected"], "assistant")}


def _run_trl(a: argparse.Namespace, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.finetune import load_tokenizer
    from tunesmith.finetune.model import load_base_model

    lines = Path(a.train).read_text().splitlines()
    order = json.loads(Path(a.order).read_text())
    rows = [_conversation(json.loads(lines[n - 1])) for step in order for n in step]
    got: dict = {"losses": [], "own_tokens": 0, "padded_tokens": 0, "t0": 0.0, "t1": 0.0}
    cuda = torch.cuda.is_available()

    class Measured(DPOTrainer):
        """Keeps each step's loss and counts the tokens of TRL's own batches (non-pad and padded)."""

        def compute_loss(self, model, inputs, *args, **kw):
            got["own_tokens"] += int(inputs["attention_mask"].sum())
            got["padded_tokens"] += inputs["input_ids"].numel()
            loss = super().compute_loss(model, inputs, *args, **kw)
            got["losses"].append(loss.detach())
            return loss

    class StepClock(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            got["t0"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            if cuda:
                torch.cuda.synchronize()
            got["t1"] = time.perf_counter()

    device = "cuda" if cuda else "cpu"
    model = load_base_model(a.model, dtype=torch.bfloat16, device=device)
    args = DPOConfig(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=True, gradient_checkpointing=False, max_length=a.max_length, beta=a.beta,
        loss_type=["sigmoid"], precompute_ref_log_probs=False, train_sampling_strategy="sequential",
        logging_steps=a.steps, save_strategy="no", eval_strategy="no", report_to="none", seed=a.seed,
        data_seed=a.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)
    lora = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Measured(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(
        a.model), peft_config=lora, callbacks=[StepClock()])
    if len(trainer.train_dataset) != len(rows):  # TRL drops pairs whose prompt fills max_length
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs; raise --max-length.")
    trainer.train()
    rss = _peak_rss_mb()
    return {"pairs": len(rows), "seconds": round(got["t1"] - got["t0"], 2), "peak_rss_mb": rss,
            "losses": [round(float(x), 5) for x in got["losses"]], "own_tokens": got["own_tokens"],
            "padded_tokens": got["padded_tokens"]}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = (_run_trl(a, Path(a.out)) if a.worker == "trl"
           else _run_tunesmith(a, Path(a.out), share=a.worker == "tunesmith"))
    if torch.cuda.is_available():
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print("RESULT " + json.dumps(res), flush=True)


# -- driver: tunesmith, then TRL on tunesmith's pairs, per seed; tables with ratios -----------------------------
def _spawn(name: str, a: argparse.Namespace, model: str, tmp: Path, seed: int, train: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--out", str(tmp / f"{name}-{seed}"),
           "--seed", str(seed), "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length),
           "--r", str(a.r), "--alpha", str(a.alpha), "--lr", str(a.lr), "--beta", str(a.beta), "--warmup",
           str(a.warmup), "--threads", str(a.threads), "--train", str(train), "--order", str(tmp / f"order-{seed}.json")]
    return run_worker(cmd, f"{name} (seed {seed})")


def _whole_batches(path: Path, batch: int, tmp: Path) -> Path:
    """The pairs file cut to a multiple of `batch` records, so every micro-batch of either trainer is full."""
    lines = [x for x in path.read_text().splitlines(keepends=True) if x.strip()]
    out = tmp / "pairs.jsonl"
    out.write_text("".join(lines[: len(lines) - len(lines) % batch]))
    return out


def _summarise(runs: list[dict]) -> dict:
    """Speed: the fastest seed (noise only ever slows a run down); losses: mean (and sd) over seeds."""
    best = dict(max(runs, key=lambda r: r["tokens"] / r["seconds"]))
    finals = [r["losses"][-1] for r in runs]
    best.update(final=statistics.mean(finals), final_sd=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                steps=[statistics.mean(s) for s in zip(*(r["losses"] for r in runs))])
    return best


def tables(res: dict[str, dict]) -> str:
    base = res.get("trl")
    head = ["trainer", "pairs/s", "tokens/s", "vs trl", "tokens forwarded", "wall s (steps)", "peak RSS MB", "vs trl",
            "final loss"]
    rows = []
    for name, r in res.items():
        tps = r["tokens"] / r["seconds"]
        fwd = r.get("forwarded", base and base["padded_tokens"])
        rows.append([name, f"{r['pairs'] / r['seconds']:.2f}", f"{tps:,.1f}",
                     _ratio(tps, base and base["tokens"] / base["seconds"]), f"{fwd:,}" if fwd else "",
                     f"{r['seconds']:.2f}",
                     f"{r['peak_rss_mb']:,.0f}", _ratio(r["peak_rss_mb"], base and base["peak_rss_mb"]),
                     f"{r['final']:.4f}" + (f" +- {r['final_sd']:.4f}" if r["final_sd"] else "")])
    names = list(res)
    steps = [[str(i + 1), *(f"{res[n]['steps'][i]:.4f}" for n in names)]
             + ([f"{res['tunesmith']['steps'][i] - base['steps'][i]:+.4f}"] if base else [])
             for i in range(len(res["tunesmith"]["steps"]))]
    out = [_table(head, rows), "", "Loss per step (mean over seeds)",
           _table(["step", *(f"{n} loss" for n in names), *(["tunesmith - trl"] if base else [])], steps)]
    if base:
        pad = 1 - base["own_tokens"] / base["padded_tokens"]
        out.append(f"\nnote: TRL's own batches held {base['own_tokens']:,} real tokens (tunesmith's count of the same "
                   f"pairs: {base['tokens']:,}) and {base['padded_tokens']:,} with padding ({pad:.0%} pad); TRL also "
                   "trains what the chat template writes after the end-of-turn token (SmolLM2: \"\\n\").")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, 3 steps of 2 pairs: a smoke run")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 20; --tiny: 3)")
    ap.add_argument("--batch", type=int, help="pairs per optimizer step, one micro-batch (default 8; --tiny: 2)")
    ap.add_argument("--seeds", default="42", help="comma list; final loss is averaged over them")
    ap.add_argument("--train", default=str(PAIRS), help="pairs JSONL (prompt / chosen / rejected)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup steps = round(ratio * steps), both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="also write the results here")
    for hidden in ("--model", "--worker", "--out", "--order"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    trainers = list(TRAINERS)
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'): running tunesmith only.", flush=True)
        trainers = ["tunesmith", "tunesmith-whole"]
    with tempfile.TemporaryDirectory(prefix="dpo_bench-") as d:
        tmp = Path(d)
        if a.tiny:
            from tunesmith.finetune.tiny import build_tiny_model

            model = str(build_tiny_model(tmp / "tiny"))
            a.steps, a.batch = a.steps or 3, a.batch or 2
            a.max_length, a.r, a.alpha, a.lr, seeds = 128, 4, 8, 1e-3, seeds[:2]
        else:
            from tunesmith.finetune import resolve_base_model

            model = str(resolve_base_model("embedded"))
            a.steps, a.batch = a.steps or 20, a.batch or 8
        a.warmup = int(round(a.warmup_ratio * a.steps))
        train = _whole_batches(Path(a.train), a.batch, tmp)
        runs: dict[str, list[dict]] = {t: [] for t in trainers}
        for seed in seeds:
            ts = _spawn("tunesmith", a, model, tmp, seed, train)
            (tmp / f"order-{seed}.json").write_text(json.dumps(ts.pop("order")))  # TRL trains the same pairs
            runs["tunesmith"].append(ts)
            if "tunesmith-whole" in runs:  # data.share_prompt=false: what sharing the prompt is worth
                runs["tunesmith-whole"].append(_spawn("tunesmith-whole", a, model, tmp, seed, train))
            if "trl" in runs:  # the same pairs: the same tokens, counted by tunesmith's tokenization
                runs["trl"].append({**_spawn("trl", a, model, tmp, seed, train), "tokens": ts["tokens"]})
            for t in trainers:
                r = runs[t][-1]
                print(f"{t} seed {seed}: {r['tokens'] / r['seconds']:.1f} tokens/s, loss {r['losses'][-1]}",
                      file=sys.stderr, flush=True)
        results = {t: _summarise(rs) for t, rs in runs.items()}
    print(f"LoRA DPO, {'tiny random model' if a.tiny else 'SmolLM2-135M-Instruct (embedded)'}: r={a.r} alpha={a.alpha} "
          f"all-linear, beta {a.beta} sigmoid, lr {a.lr:g} cosine, {a.warmup} warmup steps, {a.steps} steps of "
          f"{a.batch} pairs, max_length {a.max_length}, bf16 base, seeds {seeds}, speed best of {len(seeds)}, "
          f"{os.cpu_count()} CPUs; wall s = the optimizer steps only (no model load, tokenization or saving)")
    print(tables(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
