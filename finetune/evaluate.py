"""Evaluate a run on a held-out file: loss/perplexity and generation metrics, base vs tuned side by side.

Base and tuned share one copy of the weights (the adapter is switched off for the base), so the comparison costs no
extra memory and uses the exact same prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import string
from pathlib import Path
from typing import Any

import torch

from .data import IGNORE, DataReport, build_examples, collate, detect_format, load_records, to_messages
from .generate import GenerationParams, Generator, load_generator


def normalize(text: str) -> str:
    """Lower-case, strip punctuation, backticks and articles: 'The `json` module.' == 'json module'."""
    text = text.lower().replace("`", "")
    text = "".join(c for c in text if c not in string.punctuation or c in "._")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.strip(" .").split())


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence)."""
    a, b = normalize(pred).split(), normalize(ref).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.no_grad()
def eval_loss(gen: Generator, examples: list[Any], use_adapter: bool, batch_size: int = 8) -> float:
    model = gen.model
    ctx = model.disable_adapter() if (not use_adapter and gen.has_adapter) else contextlib.nullcontext()
    tot, n = 0.0, 0
    with ctx:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i: i + batch_size], packed=False, pad_id=gen.tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(gen.device),
                           attention_mask=batch["attention_mask"].to(gen.device)).logits.float()
            tgt = batch["targets"].to(gen.device)
            tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE,
                                                     reduction="sum").item()
            n += int((tgt != IGNORE).sum())
    return tot / max(n, 1)


def evaluate_run(run: str | Path, data: str | Path, max_new_tokens: int = 64, limit: int | None = None,
                 batch_size: int = 8, compare_base: bool = True) -> dict[str, Any]:
    """Loss, perplexity, exact match and ROUGE-L on `data` for the tuned model (and the base, when it has one).

    Each record's last assistant turn is the reference; the turns before it are the prompt.
    """
    gen = load_generator(run)
    records = load_records([str(data)])[: limit or None]
    cfg_data = _data_cfg(gen)
    examples = build_examples(records, gen.tokenizer, cfg_data, DataReport())
    prompts, refs = [], []
    for rec in records:
        conv = to_messages(rec, detect_format(rec), cfg_data.system_prompt)
        if isinstance(conv, str):
            continue
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
        refs.append(conv[last]["content"])
    variants = [("tuned", True)] + ([("base", False)] if compare_base and gen.has_adapter else [])
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0)
    result: dict[str, Any] = {"run": str(run), "data": str(data), "records": len(records), "models": {}}
    for name, use_adapter in variants:
        loss = eval_loss(gen, examples, use_adapter, batch_size)
        outs = gen.batch(prompts, GenerationParams(**{**params.__dict__, "use_adapter": use_adapter}),
                         max_batch_size=batch_size) if prompts else []
        em = [normalize(o.text) == normalize(r) for o, r in zip(outs, refs)]
        rl = [rouge_l(o.text, r) for o, r in zip(outs, refs)]
        result["models"][name] = {
            "loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3),
            "exact_match": round(sum(em) / max(len(em), 1), 4), "rouge_l": round(sum(rl) / max(len(rl), 1), 4),
            "samples": [{"prompt": p[-1]["content"], "reference": r, "output": o.text}
                        for p, r, o in list(zip(prompts, refs, outs))[:5]],
        }
    return result


def format_table(result: dict[str, Any]) -> str:
    models = result["models"]
    names = list(models)
    rows = [("metric", *names)]
    for key in ("loss", "perplexity", "exact_match", "rouge_l"):
        rows.append((key, *(f"{models[n][key]:.4f}" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{result['records']} records from {result['data']}\n" + "\n".join(lines)


def save_result(result: dict[str, Any], run: str | Path) -> Path | None:
    run = Path(run)
    if not (run / "config.yaml").exists():
        return None
    path = run / "eval.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def _data_cfg(gen: Generator) -> Any:
    """The run's own data settings (template, max_length) so eval tokenizes exactly like training did."""
    from .config import DataConfig, _build

    raw = dict(gen.loaded.config.get("data", {}))
    raw.update(train=[], validation=[], on_bad_record="error")
    return _build(DataConfig, raw, "data.", "run config")
