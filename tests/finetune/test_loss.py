"""The fused head loss (finetune/loss.py `_HeadLoss`): chunked, its cross-entropy gradient written out, against
`F.cross_entropy` through autograd."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunesmith.finetune.loss import _HeadLoss, head_logits


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
    got = _HeadLoss.apply(h, t, causal, 8)  # three chunks, the last of 7 rows
    (got_grad,) = torch.autograd.grad(got * 0.5, h)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_no_gradient_when_none_is_needed() -> None:
    causal = _Causal(8, 20, None).requires_grad_(False)
    h, t = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        got = _HeadLoss.apply(h, t, causal, 4)
    torch.testing.assert_close(got, F.cross_entropy(head_logits(causal, h), t, reduction="sum"))
