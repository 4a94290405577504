"""Int8 weights for the decode step: a CPU reads every weight once per generated token, so decoding is bound by
memory bandwidth, not arithmetic.

Measured on an idle 2-core Xeon (AMX): one pass over SmolLM2-135M's bf16 linear weights (270 MB) takes ~38 ms,
~26 tokens/s before any other work; the same pass over int8 weights with per-output-channel scales
(`torch.ops.aten._weight_int8pack_mm`, torch's weight-only int8 kernel, the one gpt-fast uses on CPU) takes ~17 ms.
That kernel only wins for a few rows at a time (1 row 3.8x, 4 rows 2.3x, 16 rows 0.6x of bf16 `linear`), so the
layer keeps its original weight too: long prompts (prefill), large batches and training read the exact weights;
only calls of at most `max_rows(dtype)` rows (tokens) read the int8 copy. That costs half the linear weights' size
again in memory.

For an fp32 model (CPUs without fast bf16 get one, see `model.pick_dtype`) torch's kernel is slow: its fp32 path is
scalar, its bf16 one compute-bound. There the int8 weights are read by tunesmith's own AVX2 kernel
(finetune/int8cpu.py, fp32 activations, built once per machine), or, where it cannot be built, by torch's kernel on
bf16 activations. Measured on an idle 2-core AMD EPYC with AVX2 only, one token's pass over SmolLM2-135M's int8
linears: torch's kernel on bf16 activations 14.6 ms, tunesmith's 6-7 ms.

Int8 changes answers a little (round-to-nearest per output channel: a relative error of ~0.4% per weight), so it
is a serving choice, never a default of the Python API: `load_generator(..., decode_weights="int8")`, and
`tunesmith chat|serve|ui --decode-weights` (default `auto`: int8 on a CPU, exact elsewhere).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import int8cpu

INT8_MAX_ROWS = 4
"""Rows (tokens in the call, summed over the batch) up to which the int8 kernel beats bf16 `linear` (measured)."""
INT8_MAX_ROWS_FP32 = 16
"""The same for an fp32 model read by torch's kernel (int8 on bf16 activations vs fp32 `linear`, the AVX2 EPYC above,
10 layers' linears: 1 row 2.7x, 4 rows 3.8x, 8 rows 2.0x, 16 rows 1.3x, 32 rows 1.1x, 64 rows 0.7x)."""
INT8_MAX_ROWS_AVX2 = 64
"""The same for an fp32 model read by tunesmith's AVX2 kernel (finetune/int8cpu.py). SmolLM2-135M's whole forward
over one prompt of N tokens, int8 vs fp32 `linear`, the AVX2 EPYC above: 17 tokens 1.84x (fp32 `linear` is slow for
17-24 rows there), 24 1.58x, 32 1.43x, 48 1.26x, 64 1.14x, 96 1.05x, 128 0.86x. So a chat's next turn (its earlier
turns reused from the prefix cache, finetune/prefixes.py) prefills its few new tokens int8 too."""

DECODE_WEIGHTS = ("auto", "exact", "int8")

_local = threading.local()


@contextlib.contextmanager
def int8_reads() -> Iterator[None]:
    """The calling thread's model calls may read int8 weights (generation); everything else (scoring, prompt
    log-probs, training) on any thread keeps reading the exact ones."""
    before = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = before


def kernel_dtype(dtype: torch.dtype, shape: torch.Size) -> torch.dtype:
    """The activation dtype the int8 kernel runs in for a [N, K] weight of a model of `dtype`: its own, except fp32
    without tunesmith's AVX2 kernel (or an odd shape, `int8cpu.fits`) -> bf16 (torch's fp32 path is no faster than
    fp32 `linear`, module docstring)."""
    if dtype != torch.float32:
        return dtype
    return torch.float32 if int8cpu.fits(shape) and int8cpu.available() else torch.bfloat16


def quantize_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 weight and per-output-channel scale for the kernel a model of `dtype` decodes with: [N, K] as
    `_weight_int8pack_mm` reads it, or `int8cpu.pack`ed (4-D) for tunesmith's fp32 kernel. The scale is rounded to
    the kernel's dtype first (`kernel_dtype`; bf16 keeps 8 bits), so every weight lands within half a step of its
    int8 value."""
    dtype = kernel_dtype(dtype, w.shape)
    w = w.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return (int8cpu.pack(q) if dtype == torch.float32 else q), scale


def max_rows(dtype: torch.dtype, kernel: torch.dtype | None = None) -> int:
    """Rows up to which a model of `dtype` reads its int8 copy; `kernel`: the copy's scale dtype, fp32 where
    tunesmith's AVX2 kernel reads it (`kernel_dtype`)."""
    if dtype != torch.float32:
        return INT8_MAX_ROWS
    return INT8_MAX_ROWS_AVX2 if kernel == torch.float32 else INT8_MAX_ROWS_FP32


def _reads_int8(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """A call of a few rows, inside generation, no grad, in the dtype the copy was made for (a model cast after
    quantizing reads its exact weights)."""
    fits = scale.dtype == x.dtype or (x.dtype == torch.float32 and scale.dtype == torch.bfloat16)
    return (x.numel() // x.shape[-1] <= max_rows(x.dtype, scale.dtype) and getattr(_local, "on", False)
            and not torch.is_grad_enabled() and fits)


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear` on the int8 weight: a packed (4-D) one through tunesmith's fp32 kernel, else torch's kernel with
    activations cast to its dtype and back (a no-op unless fp32)."""
    flat = x.reshape(-1, x.shape[-1])
    if q.dim() == 4:
        y = int8cpu.int8_linear(flat.contiguous(), q, scale)
    else:
        y = torch.ops.aten._weight_int8pack_mm(flat.to(scale.dtype), q, scale).to(x.dtype)
    y = y.reshape(*x.shape[:-1], scale.shape[0])
    return y if bias is None else y + bias


class Int8DecodeLinear(torch.nn.Module):
    """A `nn.Linear` that reads int8 weights for calls of a few rows and its own exact weight otherwise.

    It keeps `weight`/`bias` as the very same parameters (tied embeddings stay tied, peft's LoRA layer still finds
    `base_layer.weight`), and presents `in_features`/`out_features` like the layer it wraps."""

    qweight: torch.Tensor
    qscale: torch.Tensor

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scale = quantize_rows(linear.weight, linear.weight.dtype)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("qscale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _reads_int8(x, self.qscale):
            return F.linear(x, self.weight, self.bias)
        return _int8_linear(x, self.qweight, self.qscale, self.bias)

    def extra_repr(self) -> str:
        rows = max_rows(self.weight.dtype, self.qscale.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {rows} rows"


def _merge_lora_int8(layer: torch.nn.Module) -> bool:
    """Give a LoRA layer one int8 copy of its base weight with the active adapters merged in (peft's own
    `get_delta_weight`), read by its decode calls instead of the base matmul + LoRA's five small ops: with 7
    adapted linears a layer, those ops cost more per token than the int8 matmuls. Any other call (more rows, grad,
    the adapter switched off or changed, peft's per-row `adapter_names`) runs peft's forward on the exact weights.
    Plain LoRA on a `nn.Linear` only (no DoRA or other variants, no LoRA bias); returns whether it applied."""
    lora: Any = layer
    base = lora.get_base_layer()
    active = tuple(lora.active_adapters)
    adapters = [a for a in active if a in lora.lora_A]
    if (type(base) is not torch.nn.Linear or base.weight.device.type != "cpu" or lora.merged or not adapters
            or any(a in getattr(lora, "lora_variant", {}) or lora.lora_B[a].bias is not None for a in adapters)):
        return False
    w = base.weight.detach().float() + sum(lora.get_delta_weight(a).float() for a in adapters)
    q, scale = quantize_rows(w, base.weight.dtype)
    lora.register_buffer("int8_merged_qweight", q, persistent=False)  # not saved: the adapter files stay as they are
    lora.register_buffer("int8_merged_qscale", scale, persistent=False)
    peft_forward = lora.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if (args or kwargs or lora.disable_adapters or lora.merged or tuple(lora.active_adapters) != active
                or not _reads_int8(x, lora.int8_merged_qscale)):
            return peft_forward(x, *args, **kwargs)
        return _int8_linear(x, lora.int8_merged_qweight, lora.int8_merged_qscale, base.bias)

    lora.forward = forward
    return True


def use_int8_decode(model: torch.nn.Module) -> int:
    """Int8 decode weights for every linear layer of `model` (CPU only: the kernel is torch's CPU one): a LoRA
    layer reads one int8 copy of its base weight with the adapter merged in (`_merge_lora_int8`; with the adapter
    switched off it decodes from its exact weights), every other `nn.Linear` becomes an `Int8DecodeLinear`.
    Returns how many layers read int8. The weights must not change afterwards (a Generator over a trained run)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):  # the adapter's own small matrices are never swapped
            for name, child in m.named_children():
                if name != "base_layer":
                    skip.update(id(x) for x in child.modules())
            if _merge_lora_int8(m):
                merged += 1
                skip.add(id(m.get_base_layer()))
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and id(m) not in skip and m.weight.device.type == "cpu"]
    for name, m in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, Int8DecodeLinear(m))
    return len(swaps) + merged


def resolve_decode_weights(choice: str, device: torch.device) -> str:
    """`auto` -> int8 on a CPU (bandwidth-bound decode), exact on an accelerator."""
    if choice not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights={choice!r}: pick one of {', '.join(DECODE_WEIGHTS)}.")
    if choice == "auto":
        return "int8" if device.type == "cpu" else "exact"
    return choice
