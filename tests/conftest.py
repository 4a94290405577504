"""Shared fixtures: tiny random models built in-process, so unit tests need neither network nor the 135M model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a BPE tokenizer and the ChatML template."""
    from tunesmith.finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_pad_eos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same, but with pad token == EOS (as SmolLM2 ships), to prove EOS stays in the labels."""
    from tunesmith.finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_pe") / "model", pad_is_eos=True)


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder on the tiny model with random non-zero LoRA weights (tuned answers differ from base)."""
    from tunesmith.finetune.tiny import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("runs") / "tiny-run", tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_gen(tiny_run_dir: Path):
    """In fp32: batched (left-padded) and single greedy answers are compared token for token, and in bf16 the padding
    shifts rounding enough to flip a random model's near-tied logits."""
    import torch

    from tunesmith.finetune.generate import load_generator

    return load_generator(tiny_run_dir, dtype=torch.float32)
