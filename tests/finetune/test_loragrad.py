"""tunesmith's AMX kernel for LoRA's gradients (finetune/loragrad.py) against the same sums in fp32, and the fused
LoRA op's backward with and without it."""

from __future__ import annotations

import pytest
import torch

from tunesmith.finetune import fused_lora, loragrad

needs_kernel = pytest.mark.skipif(loragrad.why_not() is not None, reason=f"no LoRA kernel here: {loragrad.why_not()}")


def _case(rows: int, k: int, outs: list[int], r: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    g = torch.randn(rows, sum(outs), generator=gen).to(bf)
    x = torch.randn(rows, k, generator=gen).to(bf)
    a = (torch.randn(r * len(outs), k, generator=gen) * 0.1).to(bf)
    bs = [(torch.randn(o, r, generator=gen) * 0.1).to(bf) for o in outs]
    h = x @ a.t()
    return g, x, a, bs, h


@needs_kernel
@pytest.mark.parametrize(("rows", "k", "outs", "r"), [
    (37, 64, [64, 32, 32], 4),     # odd rows: a zero row pads AMX's pairs
    (300, 96, [160, 160], 8),      # more than one 128-row product, a 44-row tail
    (2, 32, [32], 2),
])
def test_gradients_match_fp32_sums(rows: int, k: int, outs: list[int], r: int) -> None:
    g, x, a, bs, h = _case(rows, k, outs, r)
    scalings = [2.0, 0.5, 1.0][:len(outs)]
    gh, ga, gbs = loragrad.lora_grads(g, x, a, bs, h, scalings)
    col = 0
    for j, (b, s) in enumerate(zip(bs, scalings, strict=True)):
        gj = g[:, col:col + b.shape[0]].float()
        want_gh = s * gj @ b.float()
        torch.testing.assert_close(gh[:, j * r:(j + 1) * r].float(), want_gh, rtol=1e-2, atol=1e-2)
        want_gb = s * gj.t() @ h[:, j * r:(j + 1) * r].float()
        torch.testing.assert_close(gbs[j].float(), want_gb, rtol=1e-2, atol=1e-2)
        col += b.shape[0]
    torch.testing.assert_close(ga.float(), gh.float().t() @ x.float(), rtol=1e-2, atol=1e-2)
    assert gh.dtype == ga.dtype == gbs[0].dtype == torch.bfloat16


@needs_kernel
def test_fused_backward_same_with_and_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    g, x, a, bs, h = _case(96, 64, [64, 32, 32], 4, seed=1)
    w = (torch.randn(128, 64) * 0.1).to(torch.bfloat16)
    got = fused_lora._backward_impl(g, x, w, a, bs, h, [2.0] * 3, True)
    monkeypatch.setattr(loragrad, "fits", lambda *_: False)
    want = fused_lora._backward_impl(g, x, w, a, bs, h, [2.0] * 3, True)
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)  # input gradient (bf16 rounding of gh)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-2)
    for gb, wb in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(gb.float(), wb.float(), rtol=2e-2, atol=2e-2)


def test_fp32_layers_keep_the_python_loop() -> None:
    g, x, a, bs, h = _case(8, 32, [32], 2)
    assert not loragrad.fits(g.float(), x.float(), a.float(), [b.float() for b in bs], h.float())
