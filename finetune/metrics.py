"""Metrics for held-out answers: label detection, classification metrics, ROUGE, and the TF-IDF baseline.

Every number comes from a maintained library (scikit-learn, rouge-score) so it means what users expect; this module
only decides which metrics apply and lays them out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

MAX_LABELS = 50
"""More distinct answers than this is generation, not classification."""
MAX_LABEL_CHARS = 40


def detect_labels(answers: list[str]) -> list[str] | None:
    """The label set when `answers` look like classification targets, else None.

    Labels: at least 2 distinct values, at most MAX_LABELS, each short (<= 40 characters, <= 4 words) and, on
    average, each seen at least twice, so free-form answers that happen to be short (names, numbers) do not count."""
    answers = [a.strip() for a in answers]
    counts = Counter(answers)
    if not 2 <= len(counts) <= MAX_LABELS or len(answers) < 2 * len(counts):
        return None
    if any(not a or len(a) > MAX_LABEL_CHARS or len(a.split()) > 4 for a in counts):
        return None
    return sorted(counts)


def resolve_labels(setting: str | bool | list[str], answers: list[str]) -> list[str] | None:
    """`data.labels` as Config validated it: `auto` (detect), `off`, or an explicit list (the field's bool, YAML's
    bare on/off, is mapped to `auto` / `off` on load)."""
    if isinstance(setting, list):
        return list(dict.fromkeys(setting))
    return None if setting == "off" else detect_labels(answers)


def label_metrics(refs: list[str], preds: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = reference).

    A prediction outside the label set (free generation) counts as wrong for its reference's class; it gets its own
    confusion column `(other)` so the matrix shows how often the model answered off-label."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    refs = [r.strip() for r in refs]
    preds = [_snap(p, labels) for p in preds]
    cols = labels + (["(other)"] if any(p not in labels for p in preds) else [])
    preds = [p if p in labels else "(other)" for p in preds]
    p, r, f, n = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(refs, preds)), 4),
        "macro_f1": round(float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)), 4),
        "per_class": {lab: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4),
                            "f1": round(float(f[i]), 4), "support": int(n[i])} for i, lab in enumerate(labels)},
        "confusion": {"labels": cols, "matrix": confusion_matrix(refs, preds, labels=cols)[: len(labels)].tolist()},
    }


def _snap(pred: str, labels: list[str]) -> str:
    """A generated answer that is a label up to case, surrounding whitespace or a final period counts as it."""
    p = pred.strip()
    if p in labels:
        return p
    low = {lab.lower(): lab for lab in labels}
    return low.get(p.lower().rstrip("."), p)


def rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F1 with Google's `rouge-score` (stemming on), the standard implementation."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vals = [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return round(sum(vals) / max(len(vals), 1), 4)


def tfidf_baseline(train_texts: list[str], train_labels: list[str], test_texts: list[str], seed: int = 0) -> list[str]:
    """The classical baseline every fine-tune should beat: TF-IDF word 1-2-grams + char 2-5-grams, logistic regression.

    Trained on the run's own training file, so the comparison uses exactly the same examples."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    feats = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                       TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1))
    clf = make_pipeline(feats, LogisticRegression(C=10.0, max_iter=2000, random_state=seed))
    clf.fit(train_texts, train_labels)
    return [str(p) for p in clf.predict(test_texts)]


def plot_confusion(result: dict[str, Any], png: Path) -> Path:
    """One confusion matrix per model side by side (row-normalised colour, counts written in): where people look
    first to see which classes fine-tuning fixed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = {n: m for n, m in result["models"].items() if "confusion" in m}
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1, 4.6), dpi=110, squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        cols, mat = m["confusion"]["labels"], np.array(m["confusion"]["matrix"], dtype=float)
        rows = cols[: mat.shape[0]]
        norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if mat[i, j]:
                    ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(cols)), [c[:14] for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [r[:14] for r in rows], fontsize=7)
        ax.set_title(f"{name}: acc {m['accuracy']:.1%}, macro-F1 {m['macro_f1']:.3f}", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
