"""A LoRA linear layer as one op with its own backward (`train.fused_lora`): base and LoRA in fewer passes over memory.

Why: peft computes `base(x) + lora_B(lora_A(x)) * scaling` as five ops, each writing a full-size activation
(M x out: the base output, the rank-16 product, its scaled copy, the sum), and autograd adds as many in backward.
On a CPU those passes over memory, not the matmuls, are the cost: the rank-16 matmuls and their adds took 16% of a
compiled quickstart step for 6% of its FLOPs (benchmarks/profile_train.py). Here the LoRA product is accumulated
into the base output by the matmul itself (`addmm_`, in place: no sum tensor) and the LoRA input gradient into the
base input gradient the same way. Inductor would turn an in-place `addmm_` into a copy plus an out-of-place addmm
(a copy of the whole output), so compiled layers call the forward and backward as two custom ops it leaves as
they are; uncompiled ones run the same code as a plain autograd Function (no op dispatch per call).

Compiled, sibling layers applied to one input (q/k/v, gate/up) run as one op (`_Group`): one matmul over their
stacked base weights, one pass over the input for their LoRA `a`s, one input gradient instead of three summed. On the
embedded model that made compiled steps 1.03-1.09x faster (alternating runs; benchmarks/README.md). On CPUs with
AMX the backward's LoRA gradients (`g @ B`, `g.T @ h`, `gh.T @ x`, for every adapter of a group) come from one pass
over the output gradient (finetune/loragrad.py; 1.04-1.08x a compiled bf16 step); elsewhere from the loop below.
A SwiGLU MLP whose gate/up run as a group takes `silu(gate) * up` from finetune/cpuops.py's op on the group's
stacked output (`use_fused_swiglu`; compiled bf16 training on CPUs with AVX-512: 1.02-1.05x a step).

Same numbers as peft: the one difference is that the LoRA product is added inside the matmul's accumulator instead
of after a rounding to the compute dtype (fp32: equal to 1e-5 in tests/finetune/test_fused_lora.py). The layer is
peft's own `lora.Linear` with its class swapped, so state dicts, saving, merging and `isinstance` checks are
unchanged; anything this op does not cover (DoRA and other variants, dropout, several active adapters, a LoRA
bias, a base that is not a plain `nn.Linear`) runs peft's forward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from . import cpuops, loragrad, rowsplit


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
             bs: list[torch.Tensor], scalings: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`x @ weight.T + bias`, each adapter's `scaling * (x @ a.T) @ b.T` accumulated into its own columns (one
    adapter, or a group's: weight, bias and `a` stacked by rows), and `x @ a.T` (kept for backward; r wide each)."""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ a.t()
    y = rowsplit.mm(x2, weight.t(), bias)  # in the row chunks this CPU runs fastest (finetune/rowsplit.py)
    col = row = 0
    for b, scaling in zip(bs, scalings, strict=True):
        out, r = b.shape
        y[:, col:col + out].addmm_(h[:, row:row + r], b.t(), alpha=scaling)
        col, row = col + out, row + r
    return y.view(*x.shape[:-1], weight.shape[0]), h


lora_linear = torch.library.custom_op("tunesmith::lora_linear", mutates_args=())(_forward)


@lora_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, bs: list[torch.Tensor],
      scalings: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.shape[:-1].numel(), a.shape[0])


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
                   h: torch.Tensor, scalings: list[float],
                   input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of x (empty when `input_grad` is false: the first layer's input), a and each b. A group's input
    gradient is one matmul over the stacked weights and one pass for all its LoRA terms."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if loragrad.fits(g, x2, a, bs, h):  # one pass over g for all three (AMX CPUs, bf16)
        gh, ga, gbs = loragrad.lora_grads(g, x2, a, bs, h, scalings)
    else:
        ghs, gbs = [], []
        col = row = 0
        for b, scaling in zip(bs, scalings, strict=True):
            out, r = b.shape
            gk = g[:, col:col + out]
            gh = gk @ b
            gh.mul_(scaling)
            gb = gk.t() @ h[:, row:row + r]
            gb.mul_(scaling)
            ghs.append(gh)
            gbs.append(gb)
            col, row = col + out, row + r
        gh = ghs[0] if len(ghs) == 1 else torch.cat(ghs, 1)
        ga = gh.t() @ x2
    if not input_grad:
        return x.new_empty(0), ga, gbs
    gx = rowsplit.mm(g, weight)
    gx.addmm_(gh, a)
    return gx.view(x.shape), ga, gbs


lora_linear_backward = torch.library.custom_op("tunesmith::lora_linear_backward", mutates_args=())(_backward_impl)


@lora_linear_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
      h: torch.Tensor, scalings: list[float], input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    return x.new_empty(x.shape if input_grad else (0,)), a.new_empty(a.shape), [b.new_empty(b.shape) for b in bs]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, weight, _bias, a, bs, scalings = inputs
    ctx.save_for_backward(x, weight, a, output[1], *bs)
    ctx.scalings = scalings


def _backward(ctx: Any, grad: torch.Tensor, _grad_h: torch.Tensor) -> tuple[Any, ...]:
    """Gradients for (x, weight, bias, a, bs, scalings); the base weights are frozen (FusedLoraLinear._parts), so
    they and their biases get none."""
    x, weight, a, h, *bs = ctx.saved_tensors
    gx, ga, gbs = lora_linear_backward(grad.contiguous(), x, weight, a, bs, h, ctx.scalings, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None), None, None, ga, gbs, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The same forward and backward without the custom ops' dispatch, for uncompiled models (one adapter): on a
    64-wide layer forward + backward took 200-225 us through the ops against 125 us this way, and a small model's
    step is mostly such overhead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float) -> torch.Tensor:
        y, h = _forward(x, weight, bias, a, [b], [scaling])
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, a, b, h = ctx.saved_tensors
        gx, ga, gbs = _backward_impl(grad.contiguous(), x, weight, a, [b], h, [ctx.scaling], ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None), None, None, ga, gbs[0], None


STACKED = "tunesmith_stacked_weight"
"""Name of the buffer (on a group's first member) holding the group's stacked base weights (`stack_groups`)."""


class _Group:
    """Sibling layers a model applies to one input (q/k/v, gate/up), run as one op when compiled: one matmul over
    their stacked base weights, one pass over the input for all their LoRA `a`s, one input gradient (instead of one
    per layer, summed). The first member called computes every member's output; the others take theirs when they
    are called with the very same input tensor, else they run alone. Grouped only where the parent's forward calls
    them together (`_called_together`); the parent's forward hook drops outputs no member took (`reset`)."""

    def __init__(self, members: list[FusedLoraLinear]) -> None:
        self.members = members
        self.source: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, member: FusedLoraLinear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        i = self.members.index(member)
        if self.source is x and i in self.pending:
            out = self.pending.pop(i)
            if not self.pending:
                self.source = None
            return out
        if self.pending:  # a member called on another input than its siblings: it runs alone
            return None
        y = self.stacked_output(x, dtype)
        if y is None:
            return None
        outs = y.split([m.out_features for m in self.members], -1)
        self.source, self.pending = x, {j: o for j, o in enumerate(outs) if j != i}
        return outs[i]

    def stacked_output(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Every member's output side by side (`[..., sum of out_features]`), or None where they cannot run as one
        op (then each runs alone)."""
        found = [m._parts(dtype) for m in self.members]  # (no assignment expression: dynamo breaks the graph there)
        parts = [p for p in found if p is not None]
        if len(parts) != len(found) or len({p[0].shape[1] for p in parts}) != 1:
            return None
        weights = [p[0] for p in parts]
        biases = [p[1] for p in parts if p[1] is not None]
        if biases and len(biases) != len(parts):
            return None
        bias = torch.cat(biases) if biases else None
        aa, bs, scalings = [p[2] for p in parts], [p[3] for p in parts], [p[4] for p in parts]
        stacked = getattr(self.members[0], STACKED, None)
        if stacked is None or stacked.dtype != dtype or stacked.shape != (sum(w.shape[0] for w in weights),
                                                                           weights[0].shape[1]):
            stacked = torch.cat(weights)
        return lora_linear(x.to(dtype).contiguous(), stacked, bias, torch.cat(aa), bs, scalings)[0]

    def reset(self, *_: Any) -> None:
        """Forget outputs no member took (a forward hook of the parent: none outlive its call)."""
        self.source, self.pending = None, {}


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling names that take one input in the decoder layers of Llama, Qwen, Mistral, Gemma, SmolLM and the like;
grouped only where the parent's forward says so (`_called_together`)."""
_BRANCHES = (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.BoolOp, ast.Lambda, ast.FunctionDef, ast.Match,
             ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@functools.cache
def _called_together(forward: Callable[..., Any], names: tuple[str, ...]) -> bool:
    """Whether a parent module's `forward` calls each of `names` once, outside any branch or loop, on the same
    argument (read once per function: every decoder layer of a model has the same forward).

    Why read the source: a group computes every member's output when the first is called, so a member the
    model then calls on another input, or not at all (Gemma 3n's layers that share another layer's keys and
    values skip k_proj and v_proj), would have been computed for nothing, and its LoRA weights would get zero
    gradients instead of none. At run time each member still checks that it got the very same input tensor."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    calls: dict[str, list[str | None]] = {}

    def visit(node: ast.AST, branched: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = branched or isinstance(child, _BRANCHES)
            func = getattr(child, "func", None)
            if (isinstance(child, ast.Call) and isinstance(func, ast.Attribute) and func.attr in names
                    and isinstance(func.value, ast.Name) and func.value.id == "self"):
                plain = len(child.args) == 1 and not child.keywords and not inner
                calls.setdefault(func.attr, []).append(ast.dump(child.args[0]) if plain else None)
            visit(child, inner)

    visit(tree.body[0], False)  # the function itself is the root, not a branch
    args = [calls.get(name, []) for name in names]
    return all(len(a) == 1 and a[0] is not None for a in args) and len({a[0] for a in args}) == 1


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear` whose forward is one `tunesmith::lora_linear` op when it can be (see the module doc)."""

    _group: _Group | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        parts = None if args or kwargs else self._parts(dtype)
        if parts is None:
            return super().forward(x, *args, **kwargs)
        if torch.compiler.is_compiling():  # autocast leaves a custom op alone; entering it here would put
            if self._group is not None:    # autocast nodes in the graph, which AOTAutograd's cache refuses
                out = self._group.output(self, x, dtype)
                if out is not None:
                    return out
            weight, bias, a, b, scaling = parts
            return lora_linear(x.to(dtype).contiguous(), weight, bias, a, [b], [scaling])[0]
        with torch.autocast(device, enabled=False):
            return _EagerLoraLinear.apply(x.to(dtype).contiguous(), *parts)

    def _parts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor,
                                                  float] | None:
        """(base weight, bias, a, b, scaling) in `dtype` when this op computes exactly what peft's forward would,
        else None. fp32 LoRA weights: the cast is differentiable, their gradients come back fp32."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if not isinstance(self.lora_dropout[name], torch.nn.Identity) or type(self.base_layer) is not torch.nn.Linear:
            return None
        base = self.base_layer
        if base.weight.requires_grad or type(base.weight) is not torch.nn.Parameter:
            return None  # a trained or sharded/quantized base (DTensor, bitsandbytes): peft's path
        if base.weight.dtype != dtype:  # e.g. an fp32 base under bf16 autocast (full precision kept on purpose)
            return None
        bias = None if base.bias is None else base.bias.to(dtype)
        a, b = (cast(torch.nn.Linear, layer[name]).weight.to(dtype) for layer in (self.lora_A, self.lora_B))
        return base.weight, bias, a, b, float(self.scaling[name])


def use_fused_lora(model: torch.nn.Module) -> int:
    """Swap every peft `lora.Linear` in `model` to FusedLoraLinear (in place) and group siblings (GROUPS) that
    share an input size. Returns how many layers were swapped."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    for parent in model.modules():
        for names in GROUPS:
            members = [m for name in names if isinstance(m := getattr(parent, name, None), FusedLoraLinear)]
            if (len(members) == len(names) and len({m.in_features for m in members}) == 1
                    and _called_together(type(parent).forward, names)):
                group = _Group(members)
                parent.register_forward_hook(group.reset)
                for m in members:
                    m._group = group
    return n


def stack_groups(model: torch.nn.Module) -> int:
    """Give each group its stacked base weight once (a non-persistent buffer on its first member), for compiled
    training. Returns how many groups got one.

    Why: without it every compiled forward concatenates q/k/v's and gate/up's weights (4.6 MB a layer on the embedded
    model) and keeps the copy for backward; the copy and its pass over memory were ~2% of a step (steps of both
    kinds alternating in one process: 1.026x at 4 x 256 tokens, 1.019x at 8 x 256; benchmarks/README.md). A copy,
    not views of one tensor: transformers' `save_pretrained` takes tensors sharing a storage for tied weights. The
    base is frozen while it trains; a merged layer leaves the group (`_parts`), and a buffer whose dtype or shape no
    longer matches is ignored (the weights are concatenated as before; members of mixed dtypes or input sizes never
    run as a group: `use_fused_lora`, `_Group.output`)."""
    n = 0
    for m in model.modules():
        if isinstance(m, FusedLoraLinear) and m._group is not None and m._group.members[0] is m:
            weights = [cast(torch.nn.Linear, member.base_layer).weight.detach() for member in m._group.members]
            m.register_buffer(STACKED, torch.cat(weights), persistent=False)
            n += 1
    return n


_SWIGLU_BODIES = ("down_proj = self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))\nreturn down_proj",
                  "return self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))")
"""The MLP forwards `use_fused_swiglu` takes over (Llama, Qwen 2/3, Mistral, SmolLM, ...: the same two lines)."""


@functools.cache
def _is_swiglu(forward: Callable[..., Any]) -> bool:
    """Whether an MLP's `forward(self, x)` is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (read once per
    class; a docstring and annotations may differ, nothing else)."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or len(fn.args.args) != 2 or fn.args.vararg \
            or fn.args.kwarg or fn.args.kwonlyargs or fn.args.defaults:
        return False
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) else fn.body
    x = fn.args.args[1].arg
    return [ast.dump(s) for s in body] in ([ast.dump(s) for s in ast.parse(b.format(x=x)).body] for b in _SWIGLU_BODIES)


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """`down_proj(silu(gate) * up)` with gate and up from their group's one op and `silu(gate) * up` from
    finetune/cpuops.py's (compiled bf16 training on a CPU), else the model's own forward."""
    group = self.gate_proj._group
    if torch.compiler.is_compiling() and group is not None and x.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype == torch.bfloat16:
            y = group.stacked_output(x, dtype)
            if y is not None and cpuops.fits(y):
                return self.down_proj(cpuops.silu_mul(y))
    return cast(Any, type(self).__mro__[1]).forward(self, x)


@functools.cache
def _swiglu_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"forward": _swiglu_forward, "__module__": cls.__module__, "__doc__": cls.__doc__})


def use_fused_swiglu(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP whose gate/up run as a group (`use_fused_lora`) finetune/cpuops.py's `silu(gate) * up`
    for compiled training (its class swapped to a subclass whose forward checks, per call, that the op applies).
    Only where the MLP's forward is the plain two-liner (`_is_swiglu`), its `act_fn` is SiLU and no hooks sit on
    gate_proj, up_proj or act_fn (the group's one op skips their module calls). Builds the op on the first call;
    returns how many MLPs were swapped (0 where it cannot run: no AVX-512, not x86)."""
    from transformers.activations import SiLUActivation

    if cpuops.why_not() is not None:
        return 0
    n = 0
    for m in model.modules():
        gate, up, act = (getattr(m, k, None) for k in ("gate_proj", "up_proj", "act_fn"))
        if not (isinstance(gate, FusedLoraLinear) and isinstance(up, FusedLoraLinear) and gate._group is not None
                and gate._group.members == [gate, up] and isinstance(act, torch.nn.Module)
                and type(act) in (torch.nn.SiLU, SiLUActivation)):
            continue
        hooked = any(h for mod in (gate, up, act) for h in (mod._forward_hooks, mod._forward_pre_hooks))
        if (gate.out_features == up.out_features and not hooked
                and isinstance(getattr(m, "down_proj", None), torch.nn.Module) and _is_swiglu(type(m).forward)):
            m.__class__ = _swiglu_class(cast(Any, type(m)))
            n += 1
    return n
