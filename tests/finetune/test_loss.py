"""The fused head loss (finetune/loss.py `_HeadLoss`): chunked, its cross-entropy gradient written out, against
`F.cross_entropy` through autograd; in bf16 on AVX-512 CPUs through finetune/cpuops.py's cross-entropy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunesmith.finetune import cpuops
from tunesmith.finetune.loss import _fast_ce, _HeadLoss, head_logits


class _Causal(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int, softcap: float | None) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.config = SimpleNamespace(final_logit_softcapping=softcap)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


@pytest.mark.parametrize("softcap", [None, 5.0])  # plain, and Gemma-2's tanh softcapping
def test_loss_and_gradient_match_cross_entropy(softcap: float | None) -> None:
    torch.manual_seed(0)
    causal = _Causal(16, 50, softcap).requires_grad_(False)
    h = torch.randn(23, 16, requires_grad=True)
    t = torch.randint(0, 50, (23,))
    want = F.cross_entropy(head_logits(causal, h), t, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * 0.5, h)
    got = _HeadLoss.apply(h, t, causal, 8, False)  # three chunks, the last of 7 rows
    (got_grad,) = torch.autograd.grad(got * 0.5, h)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_no_gradient_when_none_is_needed() -> None:
    causal = _Causal(8, 20, None).requires_grad_(False)
    h, t = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        got = _HeadLoss.apply(h, t, causal, 4, False)
    torch.testing.assert_close(got, F.cross_entropy(head_logits(causal, h), t, reduction="sum"))


@pytest.mark.skipif(cpuops.why_not() is not None, reason=f"no CPU ops here: {cpuops.why_not()}")
def test_bf16_head_loss_through_the_cpu_kernel_matches_fp32_cross_entropy() -> None:
    """The kernel's loss against F.cross_entropy of the same bf16 logits in fp32; its gradient (softmax - onehot,
    rounded once to bf16) against the fp32 path's, which rounds the same value to bf16 before the head's matmul."""
    torch.manual_seed(0)
    causal = _Causal(32, 1000, None).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(37, 32, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (37,))
    t[0] = 999  # the last column, in a masked tail of 8 (1000 = 62 x 16 + 8)
    assert _fast_ce(causal, h)
    assert not _fast_ce(_Causal(32, 1000, 5.0).to(torch.bfloat16), h)  # softcapping: torch's path
    want = _HeadLoss.apply(h, t, causal, 16, False)
    (want_grad,) = torch.autograd.grad(want, h)
    got = _HeadLoss.apply(h, t, causal, 16, True)
    (got_grad,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2, atol=1e-3)
    logits = causal.lm_head(h.detach())
    loss, grad = cpuops.cross_entropy(logits, t, True)
    assert grad is not None and grad.dtype == torch.bfloat16
    ref = logits.float().requires_grad_()
    F.cross_entropy(ref, t, reduction="sum").backward()
    assert ref.grad is not None
    torch.testing.assert_close(grad.float(), ref.grad.bfloat16().float(), rtol=0, atol=2 ** -9)  # <= 1 ulp apart
    assert cpuops.cross_entropy(logits, t, False)[1] is None
