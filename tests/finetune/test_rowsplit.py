"""Base matmuls in measured row chunks (finetune/rowsplit.py): same numbers to bf16 rounding, the choice kept per
machine and shape so a later run splits the same way."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.finetune import rowsplit


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(rowsplit, "_splits", None)
    monkeypatch.setattr(rowsplit, "_seen", {})
    return tmp_path


@pytest.mark.parametrize("chunks", rowsplit.CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_split_computes_the_product(fresh, monkeypatch, chunks, bias):
    torch.manual_seed(0)
    x, w = torch.randn(600, 64, dtype=torch.bfloat16), torch.randn(50, 64, dtype=torch.bfloat16)  # 50: uneven chunks
    b = torch.randn(50, dtype=torch.bfloat16) if bias else None
    monkeypatch.setattr(rowsplit, "_measure", lambda *_: chunks)
    got = rowsplit.mm(x, w.t(), b)
    ref = (x.float() @ w.float().t() + (b.float() if bias else 0))
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=5e-2)
    g = torch.randn(600, 50, dtype=torch.bfloat16)
    torch.testing.assert_close(rowsplit.mm(g, w).float(), g.float() @ w.float(), rtol=1e-2, atol=5e-2)
    assert rowsplit.chunks_for(x, w.t()) == chunks


def test_the_choice_is_measured_once_and_kept_on_disk(fresh, monkeypatch):
    x, w = torch.randn(512, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    chosen = rowsplit.chunks_for(x, w.t())
    assert chosen in rowsplit.CHUNKS
    saved = json.loads((fresh / "matmul_splits.json").read_text())
    assert list(saved.values()) == [chosen] and "512x32x16t" in next(iter(saved)) and "threads" in next(iter(saved))

    def again(*_):
        raise AssertionError("measured twice")

    monkeypatch.setattr(rowsplit, "_measure", again)
    monkeypatch.setattr(rowsplit, "_splits", None)  # a new process: read back from the file
    monkeypatch.setattr(rowsplit, "_seen", {})
    assert rowsplit.chunks_for(x, w.t()) == chosen
    assert rowsplit.chunks_for(torch.randn(100, 32, dtype=torch.bfloat16), w.t()) == 1  # few rows: never split
    monkeypatch.setattr(rowsplit, "_measure", lambda *_: 3)
    assert rowsplit.chunks_for(x, w.t().contiguous()) == 3  # a row-major right side: another layout, its own choice
    assert len(json.loads((fresh / "matmul_splits.json").read_text())) == 2
