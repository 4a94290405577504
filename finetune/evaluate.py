"""Evaluate a run on a held-out file, tuned vs base (vs a TF-IDF baseline): did fine-tuning pay off?

Base and tuned share one copy of the weights for LoRA runs (the adapter is switched off for the base), so the
comparison costs no extra memory and uses the exact same prompts. When the answers are labels (classification),
the report is accuracy, macro-F1, per-class scores and a confusion matrix; labels can be scored by log-likelihood so
every answer is a valid label; `baseline="tfidf"` adds scikit-learn's classical baseline trained on the run's own
training file. Every prediction is written to `eval_predictions.jsonl` so a number can always be traced to outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch

from .data import IGNORE, DataReport, build_examples, collate, load_records, prompts_and_answers
from .generate import GenerationParams, Generator, load_generator
from .loss import low_precision
from .metrics import detect_labels, label_metrics, plot_confusion, rouge_l, tfidf_baseline
from .scoring import score_candidates

Mode = Literal["auto", "generate", "score"]


@torch.no_grad()
def eval_loss(gen: Generator, examples: list[Any], use_adapter: bool, batch_size: int = 8) -> float:
    """Mean loss per trained token (the same masks as training)."""
    from peft import PeftModel

    model = gen.model
    ctx = model.disable_adapter() if (not use_adapter and isinstance(model, PeftModel)) else contextlib.nullcontext()
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


@torch.no_grad()
def label_accuracy(s: Any) -> float:
    """During training (`s` is the trainer's Setup): share of validation records whose highest log-likelihood label
    is the reference. Sharded across ranks; every rank runs the same number of batches, as FSDP's collectives need."""

    acc, labels = s.accelerator, s.labels or []
    per = max(1, 64 // len(labels))
    idx = list(range(len(s.val_prompts or [])))
    n_batches = math.ceil(len(idx) / (per * acc.num_processes))
    counts = torch.zeros(2, device=acc.device, dtype=torch.float64)
    root = acc.unwrap_model(s.loss_model)
    low = root.autocast_dtype
    s.loss_model.eval()
    if hasattr(s.loss_model, "unshard"):  # FSDP2: scoring calls the inner model, bypassing the root's gather hook
        s.loss_model.unshard()
    for b in range(n_batches):
        mine = idx[(b * acc.num_processes + acc.process_index) * per:][:per]
        real = len(mine)
        mine = mine or idx[:1]  # a rank with nothing left still joins the collective forward
        with low_precision(s.model, acc.device.type, low):
            scores = score_candidates(s.model, s.tokenizer, [s.val_prompts[i] for i in mine], labels)
        best = [labels[j] for j in scores.argmax(1).tolist()][:real]
        counts[0] += sum(p == s.val_answers[i].strip() for p, i in zip(best, mine))
        counts[1] += real
    if hasattr(s.loss_model, "reshard"):
        s.loss_model.reshard()
    s.loss_model.train()
    counts = acc.reduce(counts, reduction="sum")
    return round(float(counts[0] / counts[1].clamp(min=1)), 5)


def evaluate_run(run: str | Path, data: str | Path, max_new_tokens: int = 64, limit: int | None = None,
                 batch_size: int = 8, compare_base: bool = True, labels: list[str] | None = None,
                 mode: Mode = "auto", baseline: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of the tuned model (and the base, and a baseline) on `data`; see the module docstring.

    Each record's last assistant turn is the reference; the turns before it are the prompt. `labels`: the label
    set (default: the run's `data.labels`, else detected from the references). `mode`: `score` picks the label with
    the highest log-likelihood, `generate` decodes greedily, `auto` scores when there are labels.
    """
    gen = load_generator(run)
    records = load_records([str(data)])[: limit or None]
    cfg_data = _data_cfg(gen)
    from .pairs import detect_kind

    if detect_kind(records[0]) == "pair":
        return evaluate_preferences(gen, records, str(data), cfg_data, compare_base, batch_size)
    if detect_kind(records[0]) == "prompt":
        return evaluate_rewards(gen, records, str(data), cfg_data, compare_base, max_new_tokens, batch_size, progress)
    prompts, refs = prompts_and_answers(records, cfg_data)
    if not prompts:
        raise ValueError(f"{data}: no chat records with an assistant answer to compare against.")
    labels = labels or _run_labels(gen) or detect_labels(refs)
    if labels and (missing := sorted({r.strip() for r in refs} - set(labels))):
        raise ValueError(f"{data}: references {missing[:5]} are not in the label set {labels}. Pass --labels with "
                         "every class, or check the file is the run's task.")
    if mode == "score" and not labels:
        raise ValueError(f"{data}: --mode score needs labels: the references are not a small set of short values. "
                         "Pass --labels a,b,c or use --mode generate.")
    scoring = bool(labels) and mode in ("auto", "score")
    result: dict[str, Any] = {"run": str(run), "data": str(data), "records": len(prompts), "labels": labels,
                              "mode": "score" if scoring else "generate", "models": {}}
    examples = build_examples(records, gen.tokenizer, cfg_data, DataReport())
    outputs: dict[str, list[str]] = {}
    for name, g, use_adapter in _variants(gen, compare_base):
        m: dict[str, Any] = {}
        loss = eval_loss(g, examples, use_adapter, batch_size)
        m.update(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50)), 3))
        if scoring:
            preds = _score(g, prompts, labels or [], use_adapter, name, progress)
        else:
            preds = _generate(g, prompts, max_new_tokens, use_adapter, batch_size, name, progress)
        outputs[name] = preds
        m.update(_answer_metrics(refs, preds, labels))
        result["models"][name] = m
    if baseline == "tfidf":
        if not labels:
            raise ValueError("--baseline tfidf needs labels (a classification task); the references are free text.")
        outputs["tfidf"] = _tfidf(gen, prompts, cfg_data)
        result["models"]["tfidf"] = _answer_metrics(refs, outputs["tfidf"], labels)
    elif baseline is not None:
        raise ValueError(f"unknown baseline {baseline!r}; the one available is `tfidf`.")
    result["predictions"] = [{"prompt": p, "reference": r, "outputs": {n: o[i] for n, o in outputs.items()}}
                             for i, (p, r) in enumerate(zip(prompts, refs))]
    return result


@torch.no_grad()
def evaluate_preferences(gen: Generator, records: list[Any], data: str, cfg_data: Any, compare_base: bool = True,
                         batch_size: int = 8) -> dict[str, Any]:
    """Held-out preference pairs, tuned vs base: `preference_accuracy`, the share of pairs whose chosen answer the
    model finds likelier than the rejected one (by the log-prob summed over the answer's tokens, or per token for
    runs trained with orpo / simpo, whose rewards are length-normalised), and `logp_margin`, the mean chosen minus
    rejected log-prob. For a LoRA run the tuned model also gets `reward_accuracy`: DPO's implicit reward, its
    log-probs against the base's (the adapter switched off), ranking chosen first."""
    from .pairs import build_pair_examples, collate_pairs
    from .preference import sequence_logps

    per_token = gen.loaded.config.get("method") in ("orpo", "simpo")
    pairs = build_pair_examples(records, gen.tokenizer, gen.tokenizer.chat_template, cfg_data.max_length,
                                cfg_data.system_prompt)
    scores: dict[str, torch.Tensor] = {}
    for name, g, use_adapter in _variants(gen, compare_base):
        model: Any = g.model
        rows = []
        with model.disable_adapter() if not use_adapter and g.has_adapter else contextlib.nullcontext():
            for i in range(0, len(pairs), batch_size):
                b = collate_pairs(pairs[i: i + batch_size], g.tokenizer.pad_token_id, packed=False)
                sums, counts = sequence_logps(model, {k: v.to(g.device) for k, v in b.items()})
                rows.append(torch.stack([sums, counts]).float().cpu().view(2, 2, -1))  # (sum|count, chosen|rej, n)
        scores[name] = torch.cat(rows, dim=2)
    result: dict[str, Any] = {"run": gen.name, "data": data, "records": len(pairs), "labels": None,
                              "mode": "preference", "models": {}, "predictions": []}
    for name, sc in scores.items():
        s = sc[0] / sc[1].clamp(min=1) if per_token else sc[0]
        result["models"][name] = {"preference_accuracy": round(float((s[0] > s[1]).float().mean()), 4),
                                  "logp_margin": round(float((sc[0][0] - sc[0][1]).mean()), 4)}
    if "base" in scores and gen.has_adapter:
        h = (scores["tuned"][0] - scores["base"][0])  # log-ratio to the reference, chosen and rejected
        result["models"]["tuned"]["reward_accuracy"] = round(float((h[0] > h[1]).float().mean()), 4)
    result["predictions"] = [{"where": p.where, "logps": {n: {"chosen": round(float(sc[0][0][k]), 4),
                                                                "rejected": round(float(sc[0][1][k]), 4)}
                                                            for n, sc in scores.items()}}
                             for k, p in enumerate(pairs)]
    return result


def evaluate_rewards(gen: Generator, records: list[Any], data: str, cfg_data: Any, compare_base: bool = True,
                     max_new_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """GRPO prompts (a prompt and the fields rewards read), tuned vs base: greedy answers scored by the run's own
    `grpo.rewards`, or an exact match with each record's `answer` for a run trained otherwise. Reports
    `reward_mean` and `reward_mean/<function>` per model."""
    from .pairs import to_prompt
    from .rewards import load_reward, reward_metrics, score_rewards

    items = [to_prompt(r, cfg_data.system_prompt) for r in records]
    specs = (gen.loaded.config.get("grpo") or {}).get("rewards") or [{"name": "exact_match", "field": "answer"}]
    rewards = [load_reward(spec, where=f"{gen.name}: grpo.rewards[{k}]") for k, spec in enumerate(specs)]
    keys = sorted({k for it in items for k in it.fields})
    fields = {k: [it.fields.get(k) for it in items] for k in keys}
    prompts = [it.prompt for it in items]
    result: dict[str, Any] = {"run": gen.name, "data": data, "records": len(items), "labels": None,
                              "mode": "rewards", "models": {}}
    outputs: dict[str, list[str]] = {}
    for name, g, use_adapter in _variants(gen, compare_base):
        texts = _generate(g, prompts, max_new_tokens, use_adapter, batch_size, name, progress)
        n_tokens = [g.count_tokens(t) for t in texts]
        scores = score_rewards(rewards, prompts, texts, {**fields, "completion_tokens": n_tokens},
                               [it.where for it in items])
        result["models"][name] = {k: round(v, 4) for k, v in reward_metrics(scores, rewards).items()}
        outputs[name] = texts
    result["predictions"] = [{"prompt": it.prompt, "fields": it.fields, "outputs": {n: o[i] for n, o in outputs.items()}}
                             for i, it in enumerate(items)]
    return result


def _variants(gen: Generator, compare_base: bool) -> list[tuple[str, Generator, bool]]:
    """tuned, then base: the same weights with the adapter off (LoRA), or the base model loaded beside a full
    fine-tune."""
    out = [("tuned", gen, True)]
    if compare_base and gen.has_adapter:
        out.append(("base", gen, False))
    elif compare_base and gen.loaded.run_dir is not None and gen.loaded.config.get("finetuning_type") == "full":
        out.append(("base", load_generator(gen.loaded.base_model), True))
    return out


def _score(gen: Generator, prompts: list[Any], labels: list[str], use_adapter: bool, name: str,
           progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    per = max(1, 64 // len(labels))
    preds: list[str] = []
    with tqdm(total=len(prompts), desc=f"{name}: scoring {len(labels)} labels", disable=not progress) as bar:
        for i in range(0, len(prompts), per):
            scores = gen.score(prompts[i: i + per], labels, use_adapter=use_adapter)
            preds += [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
            bar.update(len(scores))
    return preds


def _generate(gen: Generator, prompts: list[Any], max_new_tokens: int, use_adapter: bool, batch_size: int,
              name: str, progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0, use_adapter=use_adapter)
    preds: list[str] = []
    with tqdm(total=len(prompts), desc=f"{name}: generating", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            preds += [c.text for c in gen.batch(prompts[i: i + batch_size], params, max_batch_size=batch_size)]
            bar.update(min(batch_size, len(prompts) - i))
    return preds


def _answer_metrics(refs: list[str], preds: list[str], labels: list[str] | None) -> dict[str, Any]:
    if labels:
        return label_metrics(refs, preds, labels)
    em = sum(_norm(p) == _norm(r) for p, r in zip(preds, refs)) / max(len(refs), 1)
    return {"exact_match": round(em, 4), "rouge_l": rouge_l(preds, refs)}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("`", "").strip(" .").split())


def _tfidf(gen: Generator, prompts: list[Any], cfg_data: Any) -> list[str]:
    """TF-IDF + logistic regression on the run's own training records (its user turns -> its answers)."""
    files = gen.loaded.config.get("data", {}).get("train") or []
    if not files:
        raise ValueError(f"{gen.name}: --baseline tfidf trains on the run's training file, and this model has no "
                         "run config naming one. Evaluate a run folder.")
    tr_prompts, tr_answers = prompts_and_answers(load_records(files), cfg_data)
    return tfidf_baseline([_user_text(p) for p in tr_prompts], [a.strip() for a in tr_answers],
                          [_user_text(p) for p in prompts])


def _user_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def _run_labels(gen: Generator) -> list[str] | None:
    setting = gen.loaded.config.get("data", {}).get("labels")
    return list(setting) if isinstance(setting, list) else None


METRIC_ROWS = ("loss", "perplexity", "accuracy", "macro_f1", "exact_match", "rouge_l", "preference_accuracy",
               "reward_accuracy", "logp_margin", "reward_mean")


def format_table(result: dict[str, Any]) -> str:
    models = result["models"]
    names = list(models)
    rows = [("metric", *names)]
    for key in METRIC_ROWS:
        if any(key in models[n] for n in names):
            rows.append((key, *(f"{models[n][key]:.4f}" if key in models[n] else "-" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    how = f", {len(result['labels'])} labels, {result['mode']}" if result.get("labels") else ""
    return f"{result['records']} records from {result['data']}{how}\n" + "\n".join(lines)


def save_result(result: dict[str, Any], run: str | Path) -> list[Path]:
    """eval.json (metrics), eval_predictions.jsonl (every prompt, reference and output) and, for labels,
    eval_confusion.png, in the run folder (or nowhere, for a bare model)."""
    run = Path(run)
    if not (run / "config.yaml").exists():
        return []
    preds = run / "eval_predictions.jsonl"
    with preds.open("w") as f:
        for row in result["predictions"]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    path = run / "eval.json"
    path.write_text(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    out = [path, preds]
    if result.get("labels"):
        out.append(plot_confusion(result, run / "eval_confusion.png"))
    return out


def _data_cfg(gen: Generator) -> Any:
    """The run's own data settings (template, max_length) so eval tokenizes exactly like training did."""
    from .config import DataConfig, build_section

    raw = dict(gen.loaded.config.get("data", {}))
    raw.update(train=[], validation=[], on_bad_record="error")
    return build_section(DataConfig, raw, "run config", "data.")
