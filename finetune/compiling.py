"""torch.compile for training (`train.compile`): each decoder layer compiled once, its kernels cached on disk.

Why: on a CPU an eager LoRA step spends about half its time in elementwise ops (RMSNorm, RoPE, SiLU, residual adds,
LoRA's scaling) that each read and write whole activation tensors, and memory bandwidth, not the matmul units, is
the limit (benchmarks/profile_train.py). Inductor fuses them into a few C++ loops per layer. Compiling layer by layer
(not the whole model) traces one layer and reuses the graph for every layer of the same shape: 20-40 s on two cores
the first time, ~2 s once the kernels are in `cache_dir()/inductor`.

Three choices keep it exact and fast:
- `emulate_precision_casts`, in the forward graph only: inductor otherwise keeps bf16 intermediates in fp32 where
  eager rounds them, which moved the summed loss of a batch by 0.5%; with it the compiled loss matches fp32 eager to
  0.02%. The backward graph keeps its intermediates in fp32 (no loss is computed there, and the gradients are at
  least as exact): the emulated casts had made the RMSNorm and RoPE backward kernels 2-4x slower, ~6% of a step.
- Rows are padded to a few widths (`bucket`) so a run compiles one or two shapes, not one per batch.
- Below 512 positions the `eager` attention kernel (matmul, masked softmax, matmul, fused by inductor) beats
  SDPA's CPU flash-attention backward, whose masked backward alone was a quarter of a compiled step.
`auto` compiles fp32 runs too (CPUs without fast bf16, `model.pick_dtype`): on a 2-core AMD EPYC with AVX2, steps
of the embedded model taking turns in one process ran 1.17x faster compiled (222 vs 190 tokens/s, medians of 8;
first step 44 s cold, 18 s warm). An earlier comparison in separate processes had seen no gain: this VM drifts more
between processes than that.
Evaluation, the loss check and anything else without gradients runs uncompiled (`eager`): an inference graph per
shape would cost more compile time than it saves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MIN_PARAMS = 30_000_000
"""`auto` compiles models at least this big: below it a step is mostly Python overhead, which compiling keeps."""
MIN_STEPS = 20
"""`auto` compiles runs of at least this many steps: a first compile costs 20-40 s on two cores."""
EAGER_ATTENTION_MAX_LENGTH = 512
"""Up to this row width a compiled step uses the `eager` attention kernel; above it the L x L probabilities it keeps
for backward would cost more memory than SDPA's flash kernel saves time."""
OPTIONS = {"emulate_precision_casts": True}
"""Inductor settings of the forward graph; the backward graph's differ (`backend`)."""
GRAPHS_PER_TRAINING = 2
"""Graphs one training's compiled layers add: the first layer's input needs no gradient and the others' do (a guard
each), and LoRA's scaling and every weight shape are constants of the graph. Dynamo keeps at most `recompile_limit`
(8) graphs per function in a process, and every layer class shares one transformers wrapper: an in-process sweep
over LoRA ranks hit the limit at its fifth trial, whose layers then ran eager without a word."""
DYNAMO_GRAPHS = 8
"""dynamo's default `recompile_limit`."""
_extra_graphs = 0
"""Graphs tunesmith's compiled models (trainings, decode steps) may add beyond DYNAMO_GRAPHS in this process."""


def add_graphs(n: int) -> None:
    """Count `n` more graphs a newly compiled model may add (`room_for_graphs` makes room for them)."""
    global _extra_graphs
    _extra_graphs += n
    room_for_graphs()


def graph_limit() -> int:
    return DYNAMO_GRAPHS + _extra_graphs


def room_for_graphs() -> None:
    """This thread's dynamo graph limit per function raised to `graph_limit()`: torch 2.13 keeps config settings per
    thread, so every thread that runs a compiled call calls this first (a few microseconds)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the older torch name
    if getattr(config, name) < graph_limit():
        setattr(config, name, graph_limit())


def why_not(cfg: Any, device: torch.device, processes: int, n_params: int | None = None,
            steps: int | None = None) -> str | None:
    """None when this run compiles, else why not (shown in the run's log). `train.compile` on/off decide alone.
    `n_params` / `steps` None: not known yet (before the model and data load), those conditions are left out."""
    mode = cfg.train.compile
    if mode != "auto":
        return None if mode == "on" else "train.compile=off"
    reasons = [
        (cfg.method != "sft", f"method {cfg.method} (auto compiles SFT only)"),
        (device.type != "cpu", f"{device.type} device (auto compiles on CPUs, where it was measured)"),
        (processes > 1, f"{processes} processes"),
        (cfg.train.gradient_checkpointing, "gradient checkpointing"),
        (cfg.lora.load_in_4bit, "a 4-bit base"),
        (n_params is not None and n_params < MIN_PARAMS,
         f"{(n_params or 0) / 1e6:.1f}M parameters (under {MIN_PARAMS // 1_000_000}M)"),
        (steps is not None and steps < MIN_STEPS, f"{steps} steps (under {MIN_STEPS})"),
        (not compiler(), "no C++ compiler (g++ / clang++; set CXX)"),
    ]
    off = [why for cond, why in reasons if cond]
    return "train.compile=auto: not compiling: " + ", ".join(off) if off else None


def compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (it honours $CXX)."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        if path := shutil.which(name):
            return path
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none): which of tunesmith's kernels can run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def build_library(name: str, source: str, flags: list[str]) -> str | None:
    """Compile a C++ source of torch ops (once per machine, torch version, compiler, flags and source, into
    `cache_dir()/kernels`) and load it; returns why not, or None. Shared by tunesmith's own CPU kernels
    (finetune/int8cpu.py, finetune/loragrad.py)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    from .model import cache_dir

    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (install g++, or set CXX)"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    key = hashlib.sha256("\n".join([source, torch.__version__, cxx, abi, *flags]).encode()).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"{name}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / f"{name}.cpp", Path(tmp) / lib.name
            src.write_text(source)
            cmd = [cxx, *flags, abi, *(f"-I{p}" for p in include_paths()), str(src), "-o", str(out),
                   *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                return f"{cxx} failed to build it: {done.stderr.strip()[-500:]}"
            os.replace(out, lib)  # atomic: a process building beside this one never loads a half-written file
    torch.ops.load_library(str(lib))
    return None


def built_once(build: Callable[[], str | None]) -> Callable[[], str | None]:
    """A kernel's `why_not()`: `build` (which returns why the kernel cannot run here, or None once it is loaded) runs
    on the first call only, under a lock; a read-only cache folder or a library that will not load becomes that
    answer instead of an error."""
    lock = threading.Lock()
    state: dict[str, str | None] = {}

    def why_not() -> str | None:
        with lock:
            if "why" not in state:
                try:
                    state["why"] = build()
                except (OSError, RuntimeError) as e:
                    state["why"] = f"{type(e).__name__}: {e}"
            return state["why"]

    return why_not


_probe: threading.Thread | None = None


def start_cpu_probe() -> None:
    """Start inductor's check of this CPU's vector instructions on a background thread (for `wait_for_cpu_probe`).

    Why: inductor proves each instruction set it may use (AVX2, AVX512, its bf16 and VNNI parts, AMX) by compiling a
    probe and loading it in a fresh Python process, ten of them on an AMX Xeon (~1.3 s), in every process that
    compiles, warm cache or not: it keeps the answer per process only. Started before the data and the model load,
    it is done by the time the first step compiles: a warm run's setup + first step took 10.3-10.6 s instead of
    11.2-11.9 (alternating processes, benchmarks/README.md)."""
    global _probe
    if _probe is None and compiler() is not None:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        _probe = threading.Thread(target=pick_vec_isa, daemon=True, name="tunesmith-cpu-probe")
        _probe.start()


def wait_for_cpu_probe() -> None:
    """Before compiling: let a probe started by `start_cpu_probe` finish (inductor would otherwise run its own)."""
    if _probe is not None:
        _probe.join()


def use_cache_dir() -> None:
    """Inductor's kernels go to `cache_dir()/inductor` (kept across runs) unless TORCHINDUCTOR_CACHE_DIR says else.

    Importing torch._dynamo (transformers does) already writes torch's own default (a folder in /tmp, often
    emptied at boot) into TORCHINDUCTOR_CACHE_DIR, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .model import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def compile_layers(causal: Any, max_length: int) -> int:
    """Compile every decoder layer of `causal` in place (`module.compile`, so state-dict names do not change).
    Returns how many were compiled."""
    use_cache_dir()
    wait_for_cpu_probe()
    if max_length <= EAGER_ATTENTION_MAX_LENGTH and causal.config._attn_implementation == "sdpa":
        causal.set_attn_implementation("eager")
    kinds = set(getattr(causal, "_no_split_modules", None) or [])
    layers = [m for m in causal.modules() if type(m).__name__ in kinds]
    for layer in layers:
        layer.compile(backend=backend)
    add_graphs(GRAPHS_PER_TRAINING)
    return len(layers)


def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """Inductor with OPTIONS, except that the backward graph is compiled without eager's bf16 rounding.

    inductor marks the ops to round at the time AOTAutograd traces the joint forward + backward graph (a node meta
    flag) and has no setting per graph, so the backward graph's flags are dropped before it is lowered;
    `compile_fx(inner_compile=...)` is inductor's hook for wrapping the lowering of each graph. The cache key tag
    keeps these graphs apart from ones compiled before this split (AOTAutograd's on-disk cache would otherwise hand
    a warm cache's old, fully emulated backward back: its key holds the config the forward was compiled with)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(graph: torch.fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
        if not kwargs.get("is_backward"):
            return compile_fx_inner(graph, inputs, **kwargs)
        for node in graph.graph.nodes:
            node.meta.pop("low_precision_pointwise_barrier", None)
        with inductor_config.patch(emulate_precision_casts=False):
            return compile_fx_inner(graph, inputs, **kwargs)

    tag = torch.compiler.config.cache_key_tag
    with torch.compiler.config.patch(cache_key_tag=f"{tag}|tunesmith:fp32-backward"):  # type: ignore[attr-defined]
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=OPTIONS)


def bucket(packed: bool, max_length: int, rows: int) -> dict[str, int]:
    """The padding that keeps the compiled shapes few: packed batches are `rows` rows of `max_length` (one shape),
    unpacked ones are padded to a multiple of 64 positions (at most max_length / 64 shapes)."""
    if packed:
        return {"width": max_length, "rows": rows}
    return {"multiple": 64 if max_length % 64 == 0 else 1}  # never past max_length (a learned-position limit)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules uncompiled (no-gradient work: evaluation, the loss check)."""
    with torch.compiler.set_stance("force_eager"):
        yield
