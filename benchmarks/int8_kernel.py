"""The int8 decode kernel alone: tunesmith's AVX2 `int8_linear` vs torch's `_weight_int8pack_mm` vs fp32 `linear`.

    python benchmarks/int8_kernel.py                          # SmolLM2-135M's five linear shapes, 1-16 rows
    python benchmarks/int8_kernel.py --source old_int8cpu.py  # another revision's kernel (e.g. `git show REV:finetune/int8cpu.py`)
    python benchmarks/int8_kernel.py --tiny                   # CI: small shapes, a few calls

Why a script of its own: a whole decode step mixes the kernel with attention, the graph and prefill, and this VM
drifts by ~20% between runs; a change to the kernel is judged here, old and new source one after the other in the
same minute. GFLOP/s counts 2 x rows x N x K per call; the fp32 matmul peak of the machine (one 2048^3 matmul) is
printed for scale. `--source` builds the kernel from another file's `SOURCE` (a .py like finetune/int8cpu.py or a
.cpp), in a process of its own, since one process loads one `tunesmith::int8_linear`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from chat_bench import _table
from profile_train import matmul_peak

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
"""SmolLM2-135M's linears [N, K]: q/o, k/v, gate/up, down, lm_head."""


def _source(path: Path) -> str:
    text = path.read_text()
    return text.split('SOURCE = r"""', 1)[1].split('"""', 1)[0] if path.suffix == ".py" else text


def _time(fn: Callable[..., object], args: tuple[object, ...], calls: int) -> float:
    for _ in range(3):
        fn(*args)
    t = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t) / calls


def _row(m: int, nn: int, k: int, calls: int, ours: bool) -> list[str]:
    """One table row: `m` activation rows times one int8 weight [nn, k] through each kernel."""
    from tunesmith.finetune import int8cpu

    q = torch.randint(-127, 128, (nn, k), dtype=torch.int8)
    scale = torch.rand(nn) / 100
    x = torch.randn(m, k)
    w32 = q.float() * scale[:, None]
    reps = max(1, calls // 10) if nn * k > 10_000_000 else calls
    t_torch = _time(torch.ops.aten._weight_int8pack_mm, (x.bfloat16(), q, scale.bfloat16()), reps)
    t_fp32 = _time(torch.nn.functional.linear, (x, w32), reps)
    theirs = [f"{t_torch * 1e6:,.1f}", f"{t_fp32 * 1e6:,.1f}"]
    if not ours:
        return [str(m), f"{nn}x{k}", "-", "-", *theirs, "-", "-", "-"]
    packed = int8cpu.pack(q)
    t_ours = _time(int8cpu.int8_linear, (x, packed, scale), reps)
    want = x.double() @ w32.double().T
    err = (int8cpu.int8_linear(x, packed, scale).double() - want).abs().max() / want.abs().max()
    return [str(m), f"{nn}x{k}", f"{t_ours * 1e6:,.1f}", f"{2 * m * nn * k / t_ours / 1e9:.1f}", *theirs,
            f"{t_torch / t_ours:.2f}x", f"{t_fp32 / t_ours:.2f}x", f"{err:.1e}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16", help="activation rows per call (tokens in the batch)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--source", type=Path, help="build the kernel from this file's SOURCE instead")
    ap.add_argument("--tiny", action="store_true", help="CI smoke run: small shapes, 3 calls")
    a = ap.parse_args()
    from tunesmith.finetune import int8cpu

    if a.source:
        int8cpu.SOURCE = _source(a.source)
    why = int8cpu.why_not()
    if why:
        print(f"note: tunesmith's kernel cannot run here: {why}")
    shapes = [(64, 32), (256, 64)] if a.tiny else SHAPES
    calls = 3 if a.tiny else a.calls
    torch.manual_seed(0)
    n = 256 if a.tiny else 2048
    peak = matmul_peak(torch.float32, n, 2 if a.tiny else 6)
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fp32 {n}^3 matmul {peak:.1f} GFLOP/s, "
          f"kernel source: {a.source or 'finetune/int8cpu.py'}")
    head = ["rows", "N x K", "tunesmith us", "GFLOP/s", "torch int8 (bf16) us", "fp32 linear us", "vs torch int8",
            "vs fp32", "max rel. error vs fp64"]
    print(_table(head, [_row(m, nn, k, calls, why is None) for m in [int(r) for r in a.rows.split(",")]
                        for nn, k in shapes]))


if __name__ == "__main__":
    main()
