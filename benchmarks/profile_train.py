"""Where a tunesmith LoRA training step spends its time, against what the CPU can do at best.

    python benchmarks/profile_train.py                    # embedded SmolLM2-135M, quickstart settings
    python benchmarks/profile_train.py --tiny             # seconds (smoke)
    python benchmarks/profile_train.py --experiments      # also: threads, fused AdamW, packed mask vs causal,
                                                          #       fp32 vs bf16, autocast, compiled (interleaved)
    python benchmarks/profile_train.py --compile off      # profile the uncompiled loop
    python benchmarks/profile_train.py --precision bf16   # force a dtype (default: what `fit` picks here)

1. Peak matmul GFLOP/s in bf16 and fp32 (one big `torch.matmul`), the ceiling for a matmul-bound step; measured
   again before every timed step, and the roofline uses the median of those (this VM's speed drifts by 1.5x
   within minutes: a peak taken once, minutes before the steps, moved the % of roofline by as much).
2. The step split into phases (collate, forward, backward, optimizer) by wall clock, and a torch.profiler op table
   grouped into attention / base matmuls / LoRA / output head + CE / dtype copies / optimizer.
3. GFLOP/s of each base linear shape at a few row counts and at this run's micro-batch (a oneDNN threading cliff
   ran some shapes on one core at ~1,024 rows on an AMX Xeon).
4. FLOPs per token of the step (frozen base: forward 2N + input-gradient 2N, LoRA forward 2n + both gradients 4n,
   attention over the row, output head only at trained positions) and the fraction of peak reached.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _setup(model: str, out: Path, precision: str, steps: int, batch: int, compile_mode: str = "auto"):
    from tunesmith.finetune import load_config
    from tunesmith.finetune.trainer import setup

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"base_model={model}", f"output_dir={out}", f"data.train=[{TRAIN}]", "data.val_set_size=0",
        f"train.max_steps={steps}", "train.grad_accum=1", "train.eval_every=0", "train.save_every=0",
        f"train.precision={precision}", f"train.micro_batch_size={batch}", f"train.compile={compile_mode}"])
    return setup(cfg, check_output=False)


def _step(s, step: int, timer: dict | None = None, packed: bool = True, drop_positions: bool = False,
          autocast: bool = False) -> int:
    """One optimizer step exactly as `fit` does it (one process), timed by phase. Returns real tokens."""
    from tunesmith.finetune.data import collate, examples_in

    t0 = time.perf_counter()
    group = [s.batches[i] for i in s.plan[step % len(s.plan)]]
    n_targets = sum(ex.n_targets for b in group for ex in examples_in(b))
    tokens = 0
    t_fwd = t_bwd = t_col = 0.0
    for batch in group:
        a = time.perf_counter()
        inputs = (s.inputs(batch, train=True) if packed  # as `fit` collates it (padded when compiled)
                  else collate(examples_in(batch), packed, s.tokenizer.pad_token_id))
        if drop_positions:  # same compute, plain causal mask instead of the block-diagonal one
            inputs.pop("position_ids", None)
        b = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # LoRA matmuls in bf16 too
            loss = s.loss_model(**inputs)
        c = time.perf_counter()
        (loss / n_targets).backward()
        d = time.perf_counter()
        t_col, t_fwd, t_bwd = t_col + b - a, t_fwd + c - b, t_bwd + d - c
        tokens += sum(len(ex.input_ids) for ex in examples_in(batch))
    a = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    e = time.perf_counter()
    if timer is not None:
        for k, v in (("collate", t_col), ("forward", t_fwd), ("backward", t_bwd), ("clip+optimizer", e - a),
                     ("total", e - t0)):
            timer[k] += v
        timer["tokens"] += tokens
    return tokens


_MASK_OPS = {"aten::le", "aten::ge", "aten::eq", "aten::lt", "aten::gt", "aten::where", "aten::masked_fill",
             "aten::bitwise_and", "aten::__and__", "aten::bitwise_or", "aten::__or__", "aten::logical_and"}
_MM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear"}


def _category(name: str, shapes: list, r: int, vocab: int) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name or name == "aten::bmm" or (
            "cpp_fused" in name and "softmax" in name):
        return "attention (SDPA, or bmm + fused softmax)"
    if name.startswith(("tunesmith::lora_", "_EagerLoraLinear")):  # the fused LoRA op's overhead, LoRA's gradients
        return "LoRA matmuls (rank dim)"
    if "cpp_fused" in name or "CompiledFxGraph" in name or name.startswith("tunesmith::silu_mul"):
        return "elementwise fused by inductor (norms, rope, silu, adds) or SwiGLU's op"
    if name in _MASK_OPS:
        return "attention mask building"
    if any(k in name for k in ("cross_entropy", "log_softmax", "nll_loss")):
        return "output head + CE"
    if name in _MM_OPS:
        dims = {d for sh in shapes for d in (sh or [])}
        if vocab in dims:
            return "output head + CE"
        return "LoRA matmuls (rank dim)" if r in dims else "base matmuls"
    if any(k in name.lower() for k in ("optimizer", "adamw", "_foreach", "clip_grad", "norm")):
        return "optimizer (AdamW + clip)"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy"):
        return "dtype copies / casts"
    if name in ("aten::index_select", "aten::embedding", "aten::embedding_dense_backward"):
        return "embedding"
    return "elementwise, eager ops (norms, rope, silu, add, mul, ...)"


def profile_ops(s, steps: int) -> list[tuple[str, float, float]]:
    """Self CPU time per category over `steps` steps (torch.profiler), plus the top ops."""
    from torch.profiler import ProfilerActivity, profile

    r, vocab = s.cfg.lora.r, s.model.get_base_model().config.vocab_size
    _step(s, 0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            _step(s, 1 + i)
    avgs = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in avgs)
    cats: dict[str, float] = defaultdict(float)
    for e in avgs:
        cats[_category(e.key, e.input_shapes or [], r, vocab)] += e.self_cpu_time_total
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("\ntop ops by self CPU time:")
    for e in top:
        print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / total:6.1%}  calls {e.count}")
    return [(c, v / 1e6, v / total) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])]


def matmul_rows(s, dtype: torch.dtype) -> None:
    """GFLOP/s of each base matmul shape's forward (grouped siblings stacked, as a compiled step runs them) at a few
    row counts M (tokens per micro-batch) and at this run's.

    Why: on a 2-core AMX Xeon oneDNN ran x @ W.T with 576 outputs on one thread for M of ~640-1,300 rows (~1,200
    GFLOP/s against ~2,400 at 2,048 rows), so a micro-batch of ~1,024 tokens, the quickstart's, lost most of what
    narrower packed rows saved. The table shows whether a machine has such a cliff and where."""
    base = s.model.get_base_model()
    shapes = set()
    for m in base.modules():
        if hasattr(m, "base_layer"):  # compiled, q/k/v and gate/up run as one matmul (fused_lora._Group)
            group = getattr(m, "_group", None)
            members = group.members if group is not None and s.compiled else [m]
            shapes.add((sum(x.base_layer.weight.shape[0] for x in members), m.base_layer.weight.shape[1]))
    group = [s.batches[i] for i in s.plan[0]]
    here = max(s.inputs(b, train=True)["input_ids"].numel() for b in group)
    rows = sorted({512, 1024, 1536, 2048, here})
    print(f"\nbase linear forward, GFLOP/s by rows M (this run's micro-batch: {here} tokens):")
    print("  out x in     " + "".join(f"{m:>7d}" for m in rows))
    for out, inp in sorted(shapes):
        w = torch.randn(out, inp, dtype=dtype)
        rates = []
        for m in rows:
            x = torch.randn(m, inp, dtype=dtype)
            torch.nn.functional.linear(x, w)
            best = min(_timed(x, w) for _ in range(5))
            rates.append(2 * m * inp * out / best / 1e9)
        print(f"  {out:5d} x {inp:<5d}" + "".join(f"{r:7.0f}" for r in rates))


def _timed(x: torch.Tensor, w: torch.Tensor) -> float:
    t = time.perf_counter()
    torch.nn.functional.linear(x, w)
    return time.perf_counter() - t


def flops_per_token(s) -> dict[str, float]:
    """Matmul FLOPs per input token of one training step (frozen base, LoRA on every linear)."""
    base = s.model.get_base_model()
    cfg = base.config
    n_lin = n_lora = 0
    for mod in base.modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            w = mod.base_layer.weight
            n_lin += w.numel()
            r = next(iter(mod.lora_A.values())).weight.shape[0]
            n_lora += r * (w.shape[0] + w.shape[1])
    from tunesmith.finetune.data import examples_in

    exs = [ex for b in s.batches for ex in examples_in(b)]
    tokens = sum(len(ex.input_ids) for ex in exs)
    trained = sum(ex.n_targets for ex in exs) / tokens
    row = s.row_width or s.cfg.data.max_length  # packed rows' width (data.row_width)
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    head = cfg.vocab_size * d
    return {
        "base linears (fwd 2N + input-grad 2N)": 4 * n_lin,
        "LoRA (fwd 2n + grads 4n)": 6 * n_lora,
        # QK^T and AV over the whole row (with an explicit mask SDPA computes every position), x3 fwd + bwd
        "attention over a full row": 3 * 4 * row * d * layers,
        "output head at trained positions (fwd + input-grad)": 4 * head * trained,
        "N_linear": n_lin, "n_lora": n_lora, "trained_fraction": trained,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="train.micro_batch_size: 8 x 256 tokens per step, in rows of data.row_width (quickstart: 4)")
    ap.add_argument("--experiments", action="store_true")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="train.compile for the profiled run (auto: compiled on the embedded model, as `fit` runs)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="train.precision for the profiled run (auto: bf16 on CPUs with native bf16, else fp32, "
                         "as `fit` picks; a forced bf16 on an AVX2-only CPU runs at a tenth of its fp32 speed)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="profile-") as d:
        tmp = Path(d)
        if a.tiny:
            from tunesmith.finetune.tiny import build_tiny_model

            model, a.steps = str(build_tiny_model(tmp / "tiny")), 2
        else:
            model = "embedded"
        print(f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}")
        peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
        print(f"matmul peak: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s (2048^3, best of 6)")

        if a.compile != "off":  # names each inductor kernel in the profile (else one "CompiledFxGraph" row)
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        from tunesmith.finetune.model import pick_dtype

        name = {v: k for k, v in DTYPES.items()}[pick_dtype(a.precision)]
        best = max(peak, key=peak.get)
        print(f"profiled precision: {name} (train.precision={a.precision}); the machine's best matmul dtype: {best}")
        s = _setup(model, tmp / "run", name, 100, a.batch, a.compile)
        t = time.perf_counter()
        timer: dict[str, float] = defaultdict(float)
        _step(s, 0)
        print(f"first step (compiles when compiled): {time.perf_counter() - t:.1f} s")
        peaks = []  # the peak again before every step: this VM's speed drifts within minutes (benchmarks/README.md)
        for i in range(a.steps):
            peaks.append(matmul_peak(DTYPES[best], reps=3))
            _step(s, 1 + i, timer)
        tps = timer["tokens"] / timer["total"]
        print(f"\n{name} step phases over {a.steps} steps ({timer['tokens'] / a.steps:.0f} real tokens/step), "
              f"{tps:.0f} tokens/s:")
        for k in ("collate", "forward", "backward", "clip+optimizer"):
            print(f"  {k:16s} {timer[k] / a.steps:7.3f} s/step  {timer[k] / timer['total']:6.1%}")
        f = flops_per_token(s)
        total = sum(v for k, v in f.items() if "(" in k)
        print(f"\nFLOPs per real token: {total / 1e6:.0f} M  (N_linear {f['N_linear'] / 1e6:.1f} M, LoRA "
              f"{f['n_lora'] / 1e6:.2f} M, trained fraction {f['trained_fraction']:.2f})")
        for k, v in f.items():
            if "(" in k:
                print(f"  {k:55s} {v / 1e6:7.1f} M")
        during = sorted(peaks)[len(peaks) // 2]
        limit = during * 1e9 / total  # the roofline of the machine: its fastest matmul dtype
        print(f"{best} matmul peak between the timed steps: median {during:.0f} GFLOP/s (range {min(peaks):.0f}-"
              f"{max(peaks):.0f}; {peak[best]:.0f} at start)")
        print(f"physical limit at that peak: {limit:,.0f} tokens/s; measured {tps:,.0f} = "
              f"{tps / limit:.1%} of peak ({tps * total / 1e9:.0f} GFLOP/s achieved)")
        matmul_rows(s, DTYPES[name])
        print("\nprofiler (self CPU time by category):")
        for cat, sec, frac in profile_ops(s, max(1, a.steps - 1)):
            print(f"  {cat:42s} {sec:7.2f} s  {frac:6.1%}")

        if not a.experiments:
            return
        # the variants below change the eager loop; the compiled run above joins them as one more variant
        experiments(_setup(model, tmp / "eager", "bf16", 100, a.batch, "off"),
                    _setup(model, tmp / "run32", "fp32", 100, a.batch, "off"), a, compiled=s if s.compiled else None)


def experiments(s, s32, a: argparse.Namespace, compiled=None) -> None:
    """Each variant runs one step in turn, round-robin, so load from other processes hits them all alike."""
    threads = torch.get_num_threads()
    params = [p for p in s.model.parameters() if p.requires_grad]
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    plain = s.optimizer

    def with_threads(n, **kw):
        def run(i):
            torch.set_num_threads(n)
            try:
                return _step(s, i, **kw)
            finally:
                torch.set_num_threads(threads)
        return run

    def with_fused(i):
        s.optimizer = fused
        try:
            return _step(s, i)
        finally:
            s.optimizer = plain

    variants = {
        "bf16 base, fp32 LoRA, packed, block-diagonal mask (default)": lambda i: _step(s, i),
        "bf16 + torch.autocast(bf16) around the forward (LoRA matmuls in bf16)": lambda i: _step(s, i, autocast=True),
        "bf16, same rows, plain causal mask (no position_ids: wrong, same FLOPs)": lambda i: _step(
            s, i, drop_positions=True),
        "bf16, unpacked (padded rows + attention_mask)": lambda i: _step(s, i, packed=False),
        f"bf16, 1 thread (default {threads})": with_threads(1),
        "bf16, fused AdamW": with_fused,
        "fp32 base (train.precision=fp32)": lambda i: _step(s32, i),
        "fp32 base + torch.autocast(bf16)": lambda i: _step(s32, i, autocast=True),
    }
    if compiled is not None:
        variants["bf16, compiled decoder layers (train.compile=auto, as `fit` runs)"] = lambda i: _step(compiled, i)
    tok: dict[str, float] = defaultdict(float)
    sec: dict[str, float] = defaultdict(float)
    for run in variants.values():  # warm-up
        run(0)
    for i in range(a.steps):
        for name, run in variants.items():
            t = time.perf_counter()
            tok[name] += run(1 + i)
            sec[name] += time.perf_counter() - t
            print(f"  round {i + 1}: {name[:60]} {tok[name] / sec[name]:.0f} tokens/s", flush=True)
    ref = next(iter(variants))
    print(f"\nexperiments, interleaved round-robin, {a.steps} steps each (tokens/s):")
    for name in tok:
        v = tok[name] / sec[name]
        print(f"  {name:75s} {v:8.0f}  {v / (tok[ref] / sec[ref]):5.2f}x")

if __name__ == "__main__":
    main()
