"""tunesmith's SwiGLU op (finetune/cpuops.py) against fp32 sums, and the compiled MLP that uses it
(finetune/fused_lora.py `use_fused_swiglu`) against the model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tunesmith.finetune import cpuops
from tunesmith.finetune.fused_lora import _is_swiglu, stack_groups, use_fused_lora, use_fused_swiglu

needs_kernel = pytest.mark.skipif(cpuops.why_not() is not None, reason=f"no SwiGLU op here: {cpuops.why_not()}")


def _reference(y: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.float().requires_grad_()
    gate, up = y.chunk(2, -1)
    out = F.silu(gate) * up
    out.backward(grad.float())
    assert y.grad is not None
    return out.detach(), y.grad


@needs_kernel
@pytest.mark.parametrize(("rows", "width"), [(37, 40), (5, 16), (64, 1536), (1, 3)])  # tails of 8 and 3 columns
def test_forward_and_backward_match_fp32(rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    y = (torch.randn(rows, 2 * width, generator=gen) * 4).to(torch.bfloat16)
    y[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # exp's clamp: silu ~0 and x there
    grad = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    want, want_grad = _reference(y, grad)
    yy = y.clone().requires_grad_()
    out = cpuops.silu_mul(yy)
    out.backward(grad)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, width)
    # one rounding to bf16 of an fp32 result: within half a bf16 ulp of the fp32 sums, plus the polynomial's ~1e-7
    torch.testing.assert_close(out.float(), want, rtol=2 ** -8, atol=1e-6)
    assert yy.grad is not None
    torch.testing.assert_close(yy.grad.float(), want_grad, rtol=2 ** -8, atol=1e-6)
    out = out.detach()
    assert abs(float(out[0, 0])) < 1e-20 and out[0, 1] == 200 * y[0, width + 1]


@needs_kernel
def test_op_registration_is_sound() -> None:
    """Fake tensors (what inductor traces), autograd and schema checks of torch.library."""
    y = torch.randn(6, 32).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.tunesmith.silu_mul.default, (y,))
    torch.library.opcheck(torch.ops.tunesmith.silu_mul_backward.default,
                          (torch.randn(6, 16).to(torch.bfloat16), y.detach()))


def test_only_the_plain_swiglu_forward_is_taken_over() -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2

    class Documented(torch.nn.Module):
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            """A docstring and annotations change nothing."""
            return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))

    assert _is_swiglu(LlamaMLP.forward) and _is_swiglu(Qwen2MLP.forward) and _is_swiglu(Documented.forward)
    assert _is_swiglu(Gemma2MLP.forward)  # the same source, but a tanh-GELU act_fn: use_fused_swiglu checks that
    assert not _is_swiglu(Scaled.forward)


def _lora_llama(act: str = "silu") -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, hidden_act=act)
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    use_fused_lora(model)
    stack_groups(model)
    return model


@needs_kernel
def test_compiled_mlp_uses_the_op_with_the_models_numbers() -> None:
    model = _lora_llama()
    plain = copy.deepcopy(model)
    assert use_fused_swiglu(model) == 2
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert len(mlps) == 2 and all(type(m) is not type(p) for m, p in zip(mlps, [m for m in plain.modules()
                                                                               if type(m).__name__ == "LlamaMLP"]))
    layer, plain_layer = mlps[0], next(m for m in plain.modules() if type(m).__name__ == "LlamaMLP")
    x = torch.randn(2, 24, 32).to(torch.bfloat16)
    results = []
    for run in (torch.compile(plain_layer), torch.compile(layer)):
        xx = x.clone().requires_grad_()
        run(xx).float().pow(2).sum().backward()  # compiles
        for m in (plain_layer, layer):
            m.zero_grad()
        xx = x.clone().requires_grad_()
        with profile() as prof:
            out = run(xx)
            out.float().pow(2).sum().backward()
        params = run._orig_mod.parameters() if hasattr(run, "_orig_mod") else run.parameters()
        grads = [p.grad.float() for p in params if p.requires_grad]
        results.append((out.float(), xx.grad.float(), grads, [e.name for e in prof.events()]))
    (o0, gx0, g0, ops0), (o1, gx1, g1, ops1) = results
    assert "tunesmith::silu_mul" in ops1 and "tunesmith::silu_mul_backward" in ops1
    assert "tunesmith::silu_mul" not in ops0
    torch.testing.assert_close(o1, o0, rtol=2e-2, atol=2e-2)  # both round once to bf16; exp differs by ~1e-7
    torch.testing.assert_close(gx1, gx0, rtol=2e-2, atol=2e-2)
    assert len(g0) == len(g1) == 6
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))
    assert torch.allclose(layer(x), plain_layer(x))  # uncompiled: the model's own forward, the same numbers


def test_other_activations_and_hooks_keep_the_models_forward() -> None:
    gelu = _lora_llama("gelu_pytorch_tanh")
    assert use_fused_swiglu(gelu) == 0
    hooked = _lora_llama()
    mlp = next(m for m in hooked.modules() if type(m).__name__ == "LlamaMLP")
    mlp.up_proj.register_forward_hook(lambda *_: None)
    assert use_fused_swiglu(hooked) == (1 if cpuops.why_not() is None else 0)
