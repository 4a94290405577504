"""LoRA SFT throughput: tunesmith vs TRL `SFTTrainer` + peft, same model, data, LoRA, batch, length and steps.

    python benchmarks/train_bench.py                 # embedded SmolLM2-135M, 2 repeats per config, best kept
    python benchmarks/train_bench.py --tiny          # seconds, tiny random model (CI smoke run)
    python benchmarks/train_bench.py --shape qwen2.5-7b --qlora --max-length 2048 --batch 4   # on a GPU (gpu.sh)

`--shape` trains a random-init model of a real checkpoint's shape (benchmarks/shapes.py: Llama-3.2-1B, Qwen2.5-7B,
Gemma-2-2B), built once in the driver: what the GPU machine, which has no network and no checkpoints, can run.
`--qlora` loads its base in 4-bit NF4 for every trainer (bitsandbytes, CUDA). Then the table also has each worker's
peak GPU memory (`torch.cuda.max_memory_allocated`), the number the issue's "<= 0.6x TRL" is about.

Each (config, repeat) trains in its own subprocess so peak RSS is clean. Measured per run:
- real tokens/s: non-pad input tokens of the optimizer steps / wall time of the training loop (model load,
  tokenization and saving excluded, the same for both); the first step (torch.compile's, when compiled) counts;
- first step: seconds to the end of step 1; steady tokens/s: the same ratio over steps 2.. (no first step);
- peak RSS: VmHWM of the worker process at the end of training (includes the model load);
- train loss of the last step (mean over trained tokens; each trainer's own number);
- held-out loss: every adapter is evaluated by the same code (`tunesmith.finetune.evaluate.eval_loss`, fp32,
  unpacked, assistant tokens through EOS) on examples/data/test.jsonl, so the losses are comparable.

TRL cannot do `assistant_only_loss` with SmolLM2's chat template (no `{% generation %}` markers and TRL refuses to
patch it), so TRL gets the data in its prompt-completion form ([system, user] -> [assistant]) and trains with
`completion_only_loss`: the same assistant tokens as tunesmith plus the "\n" after `<|im_end|>` (one extra trained
token per example). Input tokens are the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
TEST = ROOT / "examples" / "data" / "test.jsonl"

CONFIGS = {
    "tunesmith": "tunesmith, packed rows, train.precision=auto (bf16 base + fp32 LoRA where the CPU runs bf16 fast, "
                 "else fp32), train.compile=auto (the product defaults)",
    "tunesmith-eager": "tunesmith with train.compile=off (uncompiled layers)",
    "tunesmith-compiled": "tunesmith with train.compile=on (auto compiles on CPUs only; this measures it on a GPU)",
    "tunesmith-fp32": "tunesmith, packed, train.precision=fp32",
    "tunesmith-peft-lora": "tunesmith with train.fused_lora=false (peft's LoRA layers as they are)",
    "tunesmith-full-rows": "tunesmith with data.row_width=max_length (every packed row max_length wide, as before "
                           "`auto` picked narrower ones)",
    "tunesmith-fileorder": "tunesmith, but examples packed in file order as TRL's packer does (no shuffle first)",
    "tunesmith-nl": "tunesmith, also trained on the \"\\n\" after <|im_end|> as TRL is (same rows, labels only)",
    "trl-packed": "TRL SFTTrainer packing=True (bfd, padding-free), bf16 base + bf16=True (fp32 where tunesmith's "
                  "auto picks fp32)",
    "trl-unpacked": "TRL SFTTrainer packing=False (padded batches), the same precision",
    "trl-liger": "trl-packed with use_liger_kernel=True (Liger's Triton RMSNorm/RoPE/SwiGLU kernels; GPU only)",
}
DEFAULT = ["tunesmith", "tunesmith-eager", "trl-packed", "trl-unpacked"]


# -- worker: one training run in this process -------------------------------------------------------------------
def _auto_dtype() -> Any:
    """The dtype tunesmith's `train.precision=auto` picks here; the TRL worker trains in the same one."""
    import torch

    from tunesmith.finetune.model import pick_dtype

    return pick_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_tunesmith(a: argparse.Namespace, out: Path) -> dict:
    from tunesmith.finetune import load_config, train

    precision = "fp32" if a.worker == "tunesmith-fp32" else "auto"
    compile_mode = {"tunesmith-eager": "off", "tunesmith-compiled": "on"}.get(a.worker, "auto")
    if a.worker == "tunesmith-fileorder":  # an experiment, not an option: which examples share a packed row
        import tunesmith.finetune.trainer as trainer
        from tunesmith.finetune.data import pack

        def packed_in_file_order(examples, micro_batch_size, max_length, packing, seed=None):
            rows = pack(examples, max_length)
            random.Random(seed).shuffle(rows)
            return [rows[i: i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]

        trainer.micro_batches = packed_in_file_order
    if a.worker == "tunesmith-nl":  # an experiment: TRL's one extra target, with every row unchanged
        import tunesmith.finetune.trainer as trainer

        def with_newline_targets(records, tok, cfg, report):
            out = build_examples(records, tok, cfg, report)
            for ex in out:
                for i in range(1, len(ex.input_ids) - 1):
                    if ex.targets[i - 1] == tok.eos_token_id == ex.input_ids[i]:  # trained EOS: also its "\n"
                        ex.targets[i] = ex.input_ids[i + 1]
            return out

        build_examples = trainer.build_examples
        trainer.build_examples = with_newline_targets
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"base_model={a.model}", f"output_dir={out}", f"data.train=[{a.train}]", "data.val_set_size=0",
        f"data.max_length={a.max_length}", "data.packing=true", f"seed={a.seed}",
        f"data.row_width={a.max_length if a.worker == 'tunesmith-full-rows' else 'auto'}",
        f"train.max_steps={0 if a.epochs else a.steps}", f"train.epochs={a.epochs or 1}",
        f"train.micro_batch_size={a.batch}", "train.grad_accum=1", "train.eval_every=0", "train.save_every=0",
        f"train.precision={precision}", f"lora.r={a.r}", f"lora.alpha={a.alpha}", f"train.lr={a.lr}",
        f"train.compile={compile_mode}", f"train.fused_lora={a.worker != 'tunesmith-peft-lora'}",
        f"lora.load_in_4bit={str(a.qlora).lower()}", f"train.gradient_checkpointing={str(a.grad_ckpt).lower()}"])
    summary = train(cfg)
    rss = _peak_rss_mb()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    tokens = [r["tokens_per_s"] * r["elapsed_s"] for r in (first, last)]
    return {"tokens": round(tokens[1]), "seconds": last["elapsed_s"], "first_step_s": first["elapsed_s"],
            "steady_tokens_per_s": round((tokens[1] - tokens[0]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9), 1),
            "trained_tokens": sum(r["target_tokens"] for r in rows), "final_loss": summary["final_loss"],
            "peak_rss_mb": rss, "adapter": str(out / "adapter")}


def _trl_dataset(path: Path):
    from datasets import Dataset

    rows = []
    for line in path.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return Dataset.from_list(rows)


def _run_trl(a: argparse.Namespace, out: Path) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    counts = {"tokens": 0, "trained": 0, "t0": None, "t1": None, "first": None}

    class CountingTrainer(SFTTrainer):
        """Counts real (non-pad) input tokens and trained tokens of every batch the optimizer sees."""

        def compute_loss(self, model, inputs, *args, **kw):
            if "attention_mask" in inputs:
                counts["tokens"] += int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, no padding
                counts["tokens"] += int(inputs["input_ids"].numel())
            counts["trained"] += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kw)

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            counts["t0"] = time.perf_counter()

        def on_step_end(self, *args, **kw):
            counts["t1"] = time.perf_counter()
            if counts["first"] is None:
                counts["first"] = (counts["t1"], counts["tokens"])

    tok = AutoTokenizer.from_pretrained(a.model)
    bf16 = _auto_dtype() == torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float32
    quant = {}
    if a.qlora:  # the 4-bit settings tunesmith's lora.load_in_4bit uses (finetune/model.py)
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    # use_kernels=False: transformers' default fetches Hub kernels on a GPU, which fails offline (Liger is the kernel row)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, use_kernels=False, **quant)
    packed = a.worker in ("trl-packed", "trl-liger")
    args = SFTConfig(
        output_dir=str(out), max_steps=-1 if a.epochs else a.steps, num_train_epochs=a.epochs or 1,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=bf16, gradient_checkpointing=a.grad_ckpt, max_length=a.max_length, packing=packed,
        use_liger_kernel=a.worker == "trl-liger",
        completion_only_loss=True, logging_steps=1, save_strategy="no", report_to="none", seed=a.seed,
        data_seed=a.seed,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = CountingTrainer(model=model, args=args, train_dataset=_trl_dataset(Path(a.train)), processing_class=tok,
                              peft_config=lora, callbacks=[Clock()])
    # the same warmup rule as tunesmith (round(5% of the steps)); TRL's own float form rounds up
    steps = a.steps if not a.epochs else math.ceil(len(trainer.get_train_dataloader()) * a.epochs)
    trainer.args.warmup_steps = int(round(0.05 * steps))
    trainer.train()
    rss = _peak_rss_mb()
    trainer.model.save_pretrained(out / "adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    (t_first, tokens_first) = counts["first"]
    return {"tokens": counts["tokens"], "seconds": round(counts["t1"] - counts["t0"], 2),
            "first_step_s": round(t_first - counts["t0"], 2),
            "steady_tokens_per_s": round((counts["tokens"] - tokens_first) / max(counts["t1"] - t_first, 1e-9), 1),
            "trained_tokens": counts["trained"], "final_loss": round(losses[-1], 5), "peak_rss_mb": rss,
            "adapter": str(out / "adapter")}


def _eval_adapter(adapter: str, max_length: int, limit: int) -> float:
    """The same held-out loss for every adapter: tunesmith's tokenization and masking, unpacked; fp32 on a CPU, the
    GPU's bf16 there (a 7B model in fp32 would load for longer than it trains)."""
    import torch

    from tunesmith.finetune import DataReport, build_examples, load_generator, load_records
    from tunesmith.finetune.config import DataConfig
    from tunesmith.finetune.evaluate import eval_loss

    gen = load_generator(adapter, dtype=None if torch.cuda.is_available() else torch.float32)
    recs = load_records([str(TEST)])[:limit]
    examples = build_examples(recs, gen.tokenizer, DataConfig(max_length=max_length), DataReport())
    return round(eval_loss(gen, examples, use_adapter=True), 5)


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    res = _run_tunesmith(a, out) if a.worker.startswith("tunesmith") else _run_trl(a, out)
    if torch.cuda.is_available():
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    res["eval_loss"] = _eval_adapter(res.pop("adapter"), a.max_length, a.eval_limit)
    res["tokens_per_s"] = round(res["tokens"] / res["seconds"], 1)
    print("RESULT " + json.dumps(res), flush=True)


# -- driver: every config in a fresh subprocess, table with ratios ---------------------------------------------
def _spawn(config: str, a: argparse.Namespace, model: str, tmp: Path, seed: int, rep: int, train: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--model", model,
           "--out", str(tmp / f"{config}-{seed}-{rep}"), "--seed", str(seed), "--epochs", str(a.epochs),
           "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length), "--r", str(a.r),
           "--alpha", str(a.alpha), "--lr", str(a.lr), "--eval-limit", str(a.eval_limit),
           "--threads", str(a.threads), "--train", str(train)]
    cmd += ["--qlora"] * a.qlora + ["--grad-ckpt"] * a.grad_ckpt
    return run_worker(cmd, config, timeout=a.worker_timeout or None)


def run_worker(cmd: list[str], name: str, timeout: float | None = None) -> dict:
    """Run one worker subprocess offline and return the JSON of its `RESULT ` line (dpo_bench.py uses it too).
    A failed or timed-out worker raises `WorkerFailed` after printing the end of its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write(_text(e.stdout)[-3000:] + _text(e.stderr)[-5000:])
        raise WorkerFailed(f"{name} ran past its {timeout:.0f} s (--worker-timeout); its output is above.") from None
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
        last = next((x for x in reversed(p.stderr.splitlines()) if x.strip()), "")
        raise WorkerFailed(f"{name} failed (exit {p.returncode}): {last[:300]}")
    return json.loads(lines[-1][len("RESULT "):])


class WorkerFailed(SystemExit):
    """A benchmark worker failed; a SystemExit, so a script that does not catch it ends with its message."""


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _permuted(train: Path, seed: int, tmp: Path) -> Path:
    """The training file with its lines in a seeded random order: one draw of which examples share a packed row."""
    lines = train.read_text().splitlines(keepends=True)
    random.Random(10_000 + seed).shuffle(lines)  # not the trainers' own seed stream
    out = tmp / f"train-permuted-{seed}.jsonl"
    out.write_text("".join(lines))
    return out


def _summarise(runs: list[dict]) -> dict:
    """Speed: the fastest run (the machine's noise only ever slows a run down). Loss: mean and spread over seeds
    (repeats of one seed give the same loss), because one seed's data order moves held-out loss by more than the
    differences between trainers."""
    best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    by_seed = list({r["seed"]: r for r in runs}.values())
    losses = [r["eval_loss"] for r in by_seed]
    best.update(eval_loss=statistics.mean(losses), eval_sd=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                eval_by_seed={r["seed"]: r["eval_loss"] for r in by_seed},
                final_loss=statistics.mean(r["final_loss"] for r in by_seed),
                tokens=round(statistics.mean(r["tokens"] for r in by_seed)),
                trained_tokens=round(statistics.mean(r["trained_tokens"] for r in by_seed)),
                all_tokens_per_s=[r["tokens_per_s"] for r in runs])
    return best


def table(results: dict[str, dict], baseline: str) -> str:
    """One row per config; a config whose workers failed gets a row saying so. On a GPU, peak GPU memory too."""
    base = results.get(baseline)
    base = base if base and "failed" not in base else None
    gpu = any("peak_gpu_mb" in r for r in results.values())
    head = ["config", "tokens/s", "vs " + baseline, "steady tok/s", "vs " + baseline, "first step s", "peak RSS MB",
            "vs " + baseline, "tokens seen", "trained tok", "train loss", "held-out loss", "by seed"]
    if gpu:
        head[8:8] = ["peak GPU MB", "vs " + baseline]
    rows = [head]
    for name, r in results.items():
        if "failed" in r:
            rows.append([name, r["failed"][:160]] + [""] * (len(head) - 2))
            continue
        tps = f"{base and r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        rss = f"{base and r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        steady = f"{base and r['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f}x" if base else "-"
        loss = f"{r['eval_loss']:.4f}" + (f" +- {r['eval_sd']:.4f}" if len(r["eval_by_seed"]) > 1 else "")
        seeds = " ".join(f"{v:.4f}" for v in r["eval_by_seed"].values())
        rows.append([name, f"{r['tokens_per_s']:,.0f}", tps, f"{r['steady_tokens_per_s']:,.0f}", steady,
                     f"{r['first_step_s']:.1f}", f"{r['peak_rss_mb']:,.0f}", rss, f"{r['tokens']:,}",
                     f"{r['trained_tokens']:,}", f"{r['final_loss']:.4f}", loss, seeds])
        if gpu:
            vram = f"{base and r['peak_gpu_mb'] / base['peak_gpu_mb']:.2f}x" if base and "peak_gpu_mb" in base else "-"
            rows[-1][8:8] = [f"{r.get('peak_gpu_mb', 0):,}", vram]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    fmt = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([fmt[0], "-+-".join("-" * w for w in widths), *fmt[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, 3 steps: a smoke run in seconds")
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma list from {list(CONFIGS)}")
    ap.add_argument("--baseline", default="trl-packed", help="config the ratios are taken against")
    ap.add_argument("--repeats", type=int, default=2, help="runs per config and seed; the fastest is kept")
    ap.add_argument("--seeds", default="42", help="comma list; held-out loss is averaged over them")
    ap.add_argument("--train", default=str(TRAIN), help="training file (chat `messages` JSONL); held-out stays "
                    "examples/data/test.jsonl")
    ap.add_argument("--permute", action="store_true",
                    help="each seed trains every config on its own random permutation of the training file, so "
                    "packers that fill rows in file order (TRL, tunesmith) get new rows per seed, the same for all")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=float, default=0.0,
                    help="train this many epochs instead of --steps: every trainer then sees exactly the same tokens")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch: packed rows (packing) or examples")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-limit", type=int, default=60, help="held-out records from examples/data/test.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="also write the results here (rewritten after every config)")
    ap.add_argument("--shape", help="train a random-init model of this real shape instead of the embedded model, "
                    "from benchmarks/shapes.py (llama-3.2-1b, qwen2.5-7b, gemma-2-2b); with --tiny, a tiny one "
                    "of its family")
    ap.add_argument("--tokenizer", help="tokenizer folder of the --shape model (default: the embedded model's)")
    ap.add_argument("--shape-dir", help="keep the --shape model in DIR/SHAPE and reuse it there (default: a temporary "
                    "folder, deleted at the end)")
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base for every trainer (CUDA + bitsandbytes)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing for every trainer")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no worker after this many seconds (0: no limit); the table has what finished")
    ap.add_argument("--worker-timeout", type=float, default=0.0, help="seconds before a worker is killed (0: none)")
    ap.add_argument("--keep-going", action="store_true",
                    help="a config whose worker fails gets a 'failed' row; the other configs still run")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'): running the tunesmith configs only.", flush=True)
        configs = [c for c in configs if not c.startswith("trl")] or ["tunesmith"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_bench-") as d:
        tmp = Path(d)
        model, label = _base_model(a, tmp)
        if a.tiny:
            a.steps, a.batch, a.max_length, a.r, a.alpha, a.eval_limit, a.repeats = 3, 2, 128, 4, 8, 8, 1
            a.epochs, seeds = 0.0, seeds[:2]
        results: dict[str, dict] = {}
        for c in configs:
            runs, failed = [], ""
            try:
                for seed in seeds:
                    train = _permuted(Path(a.train), seed, tmp) if a.permute else Path(a.train)
                    for i in range(a.repeats):
                        if a.budget_s and time.perf_counter() - start > a.budget_s:
                            raise WorkerFailed(f"not run: --budget-s {a.budget_s:.0f} s spent")
                        runs.append({**_spawn(c, a, model, tmp, seed, i, train), "seed": seed})
                        print(f"{c} seed {seed}: {runs[-1]['tokens_per_s']} tokens/s, held-out loss "
                              f"{runs[-1]['eval_loss']}", file=sys.stderr, flush=True)
            except WorkerFailed as e:
                if not a.keep_going:
                    raise
                failed = str(e)
                print(f"{c}: {failed}", file=sys.stderr, flush=True)
            results[c] = _summarise(runs) if runs else {"failed": failed}
            if a.json:
                Path(a.json).write_text(json.dumps(results, indent=2))
    machine = f"{os.cpu_count()} CPUs"
    import torch

    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"LoRA SFT, {label}: r={a.r} alpha={a.alpha} all-linear{', 4-bit NF4 base (QLoRA)' if a.qlora else ''}"
          f"{', gradient checkpointing' if a.grad_ckpt else ''}, micro-batch {a.batch} x {a.max_length} tokens, "
          f"{f'{a.epochs:g} epoch(s)' if a.epochs else f'{a.steps} steps'}, seeds {seeds}"
          f"{' (training file permuted per seed)' if a.permute else ''}, speed best of "
          f"{a.repeats * len(seeds)}, {machine}, precision auto = {str(_auto_dtype()).removeprefix('torch.')}")
    print(table(results, a.baseline if a.baseline in results else configs[0]))


def _base_model(a: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    """The model folder every worker loads, and its label for the table."""
    if a.shape:
        sys.path.insert(0, str(Path(__file__).parent))
        from shapes import build_shape_model, describe

        t0 = time.perf_counter()
        path = build_shape_model(a.shape, Path(a.shape_dir or tmp) / a.shape, a.tokenizer, tiny=a.tiny)
        print(f"{a.shape}: built and saved in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return str(path), describe(a.shape, a.tiny)
    if a.tiny:
        from tunesmith.finetune.tiny import build_tiny_model

        return str(build_tiny_model(tmp / "tiny")), "tiny random model"
    from tunesmith.finetune import resolve_base_model

    return resolve_base_model("embedded"), "SmolLM2-135M-Instruct (embedded)"


if __name__ == "__main__":
    main()
