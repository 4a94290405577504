"""Merge a run's adapter into its base model and prove the merge is faithful.

The merged folder is a plain transformers model (safetensors + tokenizer + chat template) that loads anywhere
without peft; before it is written we compare its logits with base+adapter on a real prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import MergeError
from .model import load_run
from .runs import atomic_dir


def merge_run(run: str | Path, out: str | Path | None = None, atol: float = 1e-3,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write `RUN/merged` (or `out`); returns the logit check. Merging is done in fp32 to avoid rounding drift."""
    if (Path(run) / "model" / "config.json").exists() and (Path(run) / "config.yaml").exists():
        raise MergeError(f"{run} is a full fine-tune: {Path(run) / 'model'} already is the whole model (a plain "
                         "transformers folder); there is no adapter to merge.")
    from peft import PeftModel

    loaded = load_run(run, dtype=dtype, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    if not isinstance(model, PeftModel):
        raise MergeError(f"{run} is not a run with an adapter: nothing to merge.")
    msgs = [{"role": "user", "content": "Which standard-library module defines `dumps`?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else "Hi"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits.float()
    diff = float((before - after).abs().max())
    scale = float(before.abs().max())
    if diff > atol * max(1.0, scale):
        raise MergeError(f"merged logits differ from base+adapter by {diff:.3g} (max logit {scale:.3g}); not writing.")
    target = Path(out) if out else Path(run) / "merged"
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"path": str(target), "max_abs_logit_diff": diff, "max_logit": scale, "tokens_checked": ids.shape[1]}
