"""Int8 weights for the decode step: a CPU reads every weight once per generated token, so decoding is bound by
memory bandwidth, not arithmetic.

Measured on an idle 2-core Xeon (AMX): one pass over SmolLM2-135M's bf16 linear weights (270 MB) takes ~38 ms,
~26 tokens/s before any other work; the same pass over int8 weights with per-output-channel scales
(`torch.ops.aten._weight_int8pack_mm`, torch's weight-only int8 kernel, the one gpt-fast uses on CPU) takes ~17 ms.
That kernel only wins for a few rows at a time (1 row 3.8x, 4 rows 2.3x, 16 rows 0.6x of bf16 `linear`), so the
layer keeps its original weight too: prompts (prefill), batched decode and training read the exact weights; only
calls of at most `INT8_MAX_ROWS` rows read the int8 copy. That costs half the linear weights' size again in memory.

Int8 changes answers a little (round-to-nearest per output channel: a relative error of ~0.4% per weight), so it
is a serving choice, never a default of the Python API: `load_generator(..., decode_weights="int8")`, and
`tunesmith chat|serve|ui --decode-weights` (default `auto`: int8 on a CPU, exact elsewhere).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

INT8_MAX_ROWS = 4
"""Rows (tokens in the call, summed over the batch) up to which the int8 kernel beats bf16 `linear` (measured)."""

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


class Int8DecodeLinear(torch.nn.Module):
    """A `nn.Linear` that reads int8 weights for calls of a few rows and its own exact weight otherwise.

    It keeps `weight`/`bias` as the very same parameters (tied embeddings stay tied, peft's LoRA layer still finds
    `base_layer.weight`), and presents `in_features`/`out_features` like the layer it wraps."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach().float()
        # the scale as the kernel will read it (bf16 keeps 8 bits): rounding against it keeps every weight within
        # half a step of its int8 value
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(linear.weight.dtype)
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8),
                             persistent=False)
        self.register_buffer("qscale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (rows > INT8_MAX_ROWS or not getattr(_local, "on", False) or torch.is_grad_enabled()
                or x.dtype != self.qscale.dtype):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.qweight, self.qscale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {INT8_MAX_ROWS} rows"


def use_int8_decode(model: torch.nn.Module) -> int:
    """Swap every plain `nn.Linear` of `model` (LoRA's base layers included, LoRA's own A/B kept exact) for an
    `Int8DecodeLinear`; returns how many were swapped. Only on a CPU: the kernel is torch's CPU one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_parts: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):  # the adapter's own small matrices stay exact
            for name, child in m.named_children():
                if name != "base_layer":
                    lora_parts.update(id(x) for x in child.modules())
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and id(m) not in lora_parts and m.weight.device.type == "cpu"]
    for name, m in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, Int8DecodeLinear(m))
    return len(swaps)


def resolve_decode_weights(choice: str, device: torch.device) -> str:
    """`auto` -> int8 on a CPU (bandwidth-bound decode), exact on an accelerator."""
    if choice not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights={choice!r}: pick one of {', '.join(DECODE_WEIGHTS)}.")
    if choice == "auto":
        return "int8" if device.type == "cpu" else "exact"
    return choice
