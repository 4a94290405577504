"""The base matmuls of a LoRA step, split in the row or column chunks this CPU runs fastest (`mm`).

Why: oneDNN shares a bf16 matmul between threads by a rule of its own, and at some row counts the rule leaves a
core idle. On a 2-core AMX Xeon (2 threads), at 1,056 rows (the quickstart's micro-batch: 11 packed rows of 96)
every product with 576 output columns ran at 1,050-1,470 GFLOP/s in one call: o_proj's `x @ W.T` 1,446 against
1,993 as two calls of 288 columns, down_proj's 1,277 vs 2,005, the input gradient of the stacked gate/up weight
1,048 vs 1,700 in three; at 2,016 rows one call was fastest or within noise for every shape (benchmarks/README.md).
The rule depends on the CPU, the thread count and oneDNN's version, so the split is measured, not guessed: on a
shape's first call, one call, 2-4 row chunks and 2-3 column chunks take turns, best of three runs each. The choice
is kept in `cache_dir()/matmul_splits.json` per CPU model, torch version and thread count, because a split can
change the summation order of some rows (bf16 results differ in the last bit): a resumed or repeated run on the
same machine splits the same way and computes the same numbers.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

MIN_ROWS = 512
"""Fewer rows are never split (nor measured): the chunks would be too small to keep both cores busy."""
CHUNKS = (1, 2, 3, 4, -2, -3)
"""Splits tried: row chunks (1 = one call) and, negative, column chunks of the output."""
ROUNDS = 3

_lock = threading.Lock()
_splits: dict[str, int] | None = None
_seen: dict[tuple[object, ...], int] = {}


def _file() -> Path:
    from .model import cache_dir

    return cache_dir() / "matmul_splits.json"


@functools.cache
def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(a: torch.Tensor, b: torch.Tensor) -> str:
    layout = "t" if b.stride(0) == 1 and b.shape[0] > 1 else "n"  # W.T (forward) or W (input gradient)
    return (f"{_cpu()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{a.dtype}|"
            f"{a.shape[0]}x{a.shape[1]}x{b.shape[1]}{layout}")


def _known() -> dict[str, int]:
    global _splits
    if _splits is None:
        try:
            _splits = {k: int(v) for k, v in json.loads(_file().read_text()).items()}
        except (OSError, ValueError, AttributeError):
            _splits = {}
    return _splits


def _save(key: str, chunks: int) -> None:
    """Add one choice to the file (merged with what other processes wrote meanwhile; atomic replace)."""
    path = _file()
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        current = {}
    current[key] = chunks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the choice holds for this process only
        pass


def _one(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _run(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, split: int) -> None:
    """`out = a @ b (+ bias)` in `split` row chunks (> 0) or `-split` column chunks (< 0; views, nothing copied)."""
    if split > 0:
        step = -(-a.shape[0] // split)
        for i in range(0, a.shape[0], step):
            _one(a[i: i + step], b, bias, out[i: i + step])
        return
    step = -(-b.shape[1] // -split)
    for j in range(0, b.shape[1], step):
        _one(a, b[:, j: j + step], None if bias is None else bias[j: j + step], out[:, j: j + step])


def _measure(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> int:
    """The fastest chunk count: each candidate's best of ROUNDS, candidates taking turns (a drift of the machine's
    speed then touches them all alike)."""
    best = dict.fromkeys(CHUNKS, float("inf"))
    for chunks in CHUNKS:
        _run(a, b, bias, out, chunks)  # oneDNN builds its kernel for a new shape on the first call
    for _ in range(ROUNDS):
        for chunks in CHUNKS:
            t = time.perf_counter()
            _run(a, b, bias, out, chunks)
            best[chunks] = min(best[chunks], time.perf_counter() - t)
    return min(CHUNKS, key=lambda c: best[c])


def chunks_for(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """The split `a @ b` runs in here: row chunks, or (negative) column chunks; measured on a shape's first call."""
    if a.device.type != "cpu" or a.dim() != 2 or a.shape[0] < MIN_ROWS:
        return 1
    fast = (a.shape, b.shape, b.stride(), a.dtype, torch.get_num_threads())  # every call: no string, no file
    if (chunks := _seen.get(fast)) is not None:
        return chunks
    key = _key(a, b)
    with _lock:
        known = _known()
        if key not in known:
            known[key] = _measure(a, b, bias, a.new_empty(a.shape[0], b.shape[1]))
            _save(key, known[key])
        _seen[fast] = known[key]
        return known[key]


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b (+ bias)` for 2-D `a`, in the row or column chunks this machine runs fastest."""
    chunks = chunks_for(a, b, bias)
    if chunks == 1:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    out = a.new_empty(a.shape[0], b.shape[1])
    _run(a, b, bias, out, chunks)
    return out
