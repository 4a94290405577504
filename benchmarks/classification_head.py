"""Should a classifier keep generating its label, or get a classification head? Measured on Debian sections.

The generation recipe (configs/smollm2-135m_classify.yaml, scored by label log-likelihood) is compared with the
other common recipe: the same embedded SmolLM2-135M with transformers' `AutoModelForSequenceClassification` (a new
linear head on the last token), fully fine-tuned on the same pool with the same optimiser settings, and evaluated
on the same 600 held-out records. The generation column is read from the run `domain_accuracy.py` trained
(`runs/domain/classify-N/eval.json`), so run that first for the sizes you ask for.

    python benchmarks/classification_head.py --sizes 50
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

from tunesmith.finetune import read_records, resolve_base_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "debian_sections"


def load(path: Path) -> tuple[list[str], list[str]]:
    """(user text, label) pairs: the same prompt the generation recipe sees, without the chat template."""
    xs, ys = [], []
    for rec in read_records(path):
        msgs = rec.data["messages"]
        xs.append(msgs[0]["content"])
        ys.append(msgs[1]["content"])
    return xs, ys


def train_head(size: int, epochs: int, lr: float, batch: int, seed: int) -> dict[str, float]:
    random.seed(seed)
    torch.manual_seed(seed)
    xs, ys = load(DATA / f"train_{size}.jsonl")
    tx, ty = load(DATA / "test.jsonl")
    labels = sorted(set(ys))
    path = resolve_base_model("embedded")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(xs) / batch)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(0.05 * steps)), steps)
    order = list(range(len(xs)))
    model.train()
    t0 = time.time()
    with tqdm(total=steps, desc=f"head {size}/class") as bar:
        for _ in range(epochs):
            random.shuffle(order)
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                enc = tok([xs[j] for j in idx], return_tensors="pt", padding=True, truncation=True, max_length=256)
                y = torch.tensor([labels.index(ys[j]) for j in idx])
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(**enc, labels=y).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t0
    model.eval()
    pred = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in tqdm(range(0, len(tx), 32), desc="eval"):
            enc = tok(tx[i:i + 32], return_tensors="pt", padding=True, truncation=True, max_length=256)
            pred += [labels[k] for k in model(**enc).logits.argmax(-1).tolist()]
    return {"accuracy": accuracy_score(ty, pred), "macro_f1": f1_score(ty, pred, average="macro"),
            "train_s": round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=12, help="records per step (what 4 packed rows of 256 tokens hold)")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    print("| examples/class | generation + label scoring | classification head | TF-IDF | head train s |")
    print("|---|---|---|---|---|")
    for size in [int(s) for s in a.sizes.split(",")]:
        head = train_head(size, a.epochs, a.lr, a.batch, a.seed)
        ev = ROOT / "runs" / "domain" / f"classify-{size}" / "eval.json"
        gen = json.loads(ev.read_text())["models"] if ev.exists() else {}
        fmt = lambda m: f"{m['accuracy']:.1%} (F1 {m['macro_f1']:.3f})" if m else "-"  # noqa: E731
        print(f"| {size} | {fmt(gen.get('tuned'))} | {fmt(head)} | {fmt(gen.get('tfidf'))} | {head['train_s']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
