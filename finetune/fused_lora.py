"""A LoRA linear layer as one op with its own backward (`train.fused_lora`): base and LoRA in fewer passes over memory.

Why: peft computes `base(x) + lora_B(lora_A(x)) * scaling` as five ops, each writing a full-size activation
(M x out: the base output, the rank-16 product, its scaled copy, the sum), and autograd adds as many in backward.
On a CPU those passes over memory, not the matmuls, are the cost: the rank-16 matmuls and their adds took 16% of a
compiled quickstart step for 6% of its FLOPs (benchmarks/profile_train.py). Here the LoRA product is accumulated
into the base output by the matmul itself (`addmm_`, in place: no sum tensor) and the LoRA input gradient into the
base input gradient the same way. Inductor would turn an in-place `addmm_` into a copy plus an out-of-place addmm
(a copy of the whole output), so compiled layers call the forward and backward as two custom ops it leaves as
they are; uncompiled ones run the same code as a plain autograd Function (no op dispatch per call).

Same numbers as peft: the one difference is that the LoRA product is added inside the matmul's accumulator instead
of after a rounding to the compute dtype (fp32: equal to 1e-5 in tests/finetune/test_fused_lora.py). The layer is
peft's own `lora.Linear` with its class swapped, so state dicts, saving, merging and `isinstance` checks are
unchanged; anything this op does not cover (DoRA and other variants, dropout, several active adapters, a LoRA
bias, a base that is not a plain `nn.Linear`) runs peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x @ weight.T + bias + scaling * (x @ a.T) @ b.T`, and `x @ a.T` (kept for backward; it is r wide)."""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ a.t()
    y = F.linear(x2, weight, bias)
    y.addmm_(h, b.t(), alpha=scaling)
    return y.view(*x.shape[:-1], weight.shape[0]), h


lora_linear = torch.library.custom_op("tunesmith::lora_linear", mutates_args=())(_forward)


@lora_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape[:-1].numel(), a.shape[0])


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   h: torch.Tensor, scaling: float,
                   input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x (empty when `input_grad` is false: the first layer's input), a and b."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gh = g @ b
    gh.mul_(scaling)
    gb = g.t() @ h
    gb.mul_(scaling)
    ga = gh.t() @ x2
    if not input_grad:
        return x.new_empty(0), ga, gb
    gx = g @ weight
    gx.addmm_(gh, a)
    return gx.view(x.shape), ga, gb


lora_linear_backward = torch.library.custom_op("tunesmith::lora_linear_backward", mutates_args=())(_backward_impl)


@lora_linear_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
      scaling: float, input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape if input_grad else (0,)), a.new_empty(a.shape), b.new_empty(b.shape)


def _save(ctx: Any, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
          scaling: float) -> None:
    ctx.save_for_backward(x, weight, a, b, h)
    ctx.scaling = scaling


def _grads(ctx: Any, grad: torch.Tensor, backward: Any) -> tuple[Any, ...]:
    """Gradients for (x, weight, bias, a, b, scaling) from `backward` (the custom op or its plain function); the
    base weight is frozen (FusedLoraLinear._fusable), so it and its bias get none."""
    x, weight, a, b, h = ctx.saved_tensors
    gx, ga, gb = backward(grad.contiguous(), x, weight, a, b, h, ctx.scaling, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None), None, None, ga, gb, None


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, weight, _bias, a, b, scaling = inputs
    _save(ctx, x, weight, a, b, output[1], scaling)


def _backward(ctx: Any, grad: torch.Tensor, _grad_h: torch.Tensor) -> tuple[Any, ...]:
    return _grads(ctx, grad, lora_linear_backward)


lora_linear.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The same forward and backward without the custom ops' dispatch, for uncompiled models: on a 64-wide layer
    forward + backward took 200-225 us through the ops against 125 us this way, and a small model's step is mostly
    such overhead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float) -> torch.Tensor:
        y, h = _forward(x, weight, bias, a, b, scaling)
        _save(ctx, x, weight, a, b, h, scaling)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _grads(ctx, grad, _backward_impl)


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear` whose forward is one `tunesmith::lora_linear` op when it can be (see the module doc)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fusable()
        if name is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        base = self.base_layer
        if base.weight.dtype != dtype:  # e.g. an fp32 base under bf16 autocast (full precision kept on purpose)
            return super().forward(x, *args, **kwargs)
        a = self.lora_A[name].weight.to(dtype)  # fp32 LoRA weights: the cast is differentiable, grads come back fp32
        b = self.lora_B[name].weight.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        inputs = (x.to(dtype).contiguous(), base.weight, bias, a, b, float(self.scaling[name]))
        if torch.compiler.is_compiling():  # autocast leaves a custom op alone; entering it here would put
            return lora_linear(*inputs)[0]  # autocast nodes in the graph, which AOTAutograd's cache refuses
        with torch.autocast(device, enabled=False):
            return _EagerLoraLinear.apply(*inputs)

    def _fusable(self) -> str | None:
        """The one active adapter when this op computes exactly what peft's forward would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity) or type(self.base_layer) is not torch.nn.Linear:
            return None
        if self.base_layer.weight.requires_grad or type(self.base_layer.weight) is not torch.nn.Parameter:
            return None  # a trained or sharded/quantized base (DTensor, bitsandbytes): peft's path
        return name


def use_fused_lora(model: torch.nn.Module) -> int:
    """Swap every peft `lora.Linear` in `model` to FusedLoraLinear (in place). Returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
