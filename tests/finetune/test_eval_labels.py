"""Classification eval: label detection, metrics equal scikit-learn's, label scoring picks Generator.score's argmax,
the TF-IDF baseline column, eval files, and `eval_accuracy` logged during training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tunesmith.finetune.config import load_config
from tunesmith.finetune.metrics import detect_labels, label_metrics, resolve_labels

LABELS = ["billing", "bug", "question"]
WORDS = {"billing": ["invoice", "refund", "charged", "payment"], "bug": ["crash", "error", "traceback", "broken"],
         "question": ["how", "where", "what", "can"]}


def write_tickets(path: Path, n_per: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for lab in LABELS:
        for _ in range(n_per):
            text = " ".join(rng.choice(WORDS[lab]) for _ in range(4)) + " " + rng.choice(["please", "today", "now"])
            rows.append({"messages": [{"role": "user", "content": f"Label this ticket: {text}"},
                                      {"role": "assistant", "content": lab}]})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_detect_labels():
    assert detect_labels(["pos", "neg", "pos", "neg", "neu", "neu"]) == ["neg", "neu", "pos"]
    assert detect_labels(["pos", "pos"]) is None  # one class is not classification
    assert detect_labels(["The json module.", "Use pathlib.Path.glob for that.", "a", "b"]) is None
    assert detect_labels([f"answer {i}" for i in range(10)]) is None  # every answer different: free text
    assert detect_labels(["x" * 41, "y", "x" * 41, "y"]) is None
    assert resolve_labels("off", ["a", "b", "a", "b"]) is None
    assert resolve_labels(["b", "a", "b"], []) == ["b", "a"]


def test_label_metrics_equal_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    refs = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "a"]
    preds = ["a", "b", "a", "b", "c", "c", "c", "a", "Nonsense", " A. "]
    m = label_metrics(refs, preds, ["a", "b", "c"])
    snapped = ["a", "b", "a", "b", "c", "c", "c", "a", "(other)", "a"]  # " A. " counts as "a"; junk is its own column
    assert m["accuracy"] == pytest.approx(accuracy_score(refs, snapped), abs=1e-4) == 0.6
    assert m["macro_f1"] == pytest.approx(f1_score(refs, snapped, labels=["a", "b", "c"], average="macro"), abs=1e-4)
    p, r, f, n = precision_recall_fscore_support(refs, snapped, labels=["a", "b", "c"], zero_division=0)
    assert m["per_class"]["c"] == {"precision": round(p[2], 4), "recall": round(r[2], 4), "f1": round(f[2], 4),
                                   "support": 4}
    assert m["per_class"]["a"]["recall"] == 0.75 and m["per_class"]["b"]["precision"] == 0.5  # by hand
    assert m["confusion"]["labels"] == ["a", "b", "c", "(other)"]
    want = confusion_matrix(refs, snapped, labels=["a", "b", "c", "(other)"])[:3].tolist()
    assert m["confusion"]["matrix"] == want == [[3, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 1]]


@pytest.fixture(scope="module")
def label_run(tiny_model_dir, tmp_path_factory):
    """A tiny run trained on ticket labels, with periodic evals (so eval_accuracy is logged) and on_eval recorded."""
    from tunesmith.finetune.trainer import train

    d = tmp_path_factory.mktemp("labels")
    train_file = write_tickets(d / "train.jsonl", 12, seed=0)
    test_file = write_tickets(d / "test.jsonl", 4, seed=1)
    seen: list[tuple[int, dict]] = []
    cfg = load_config(None, [f"base_model={tiny_model_dir}", f"output_dir={d / 'run'}", f"data.train=[{train_file}]",
                             "data.val_set_size=6", "data.max_length=64", "train.precision=fp32", "train.lr=5e-3",
                             "train.max_steps=4", "train.micro_batch_size=4", "train.eval_every=2", "seed=0"])
    summary = train(cfg, on_eval=lambda step, m: seen.append((step, m)))
    return d / "run", test_file, summary, seen


def test_training_logs_eval_accuracy(label_run):
    run, _, summary, seen = label_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    accs = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)  # step 2 and the final eval
    assert [s for s, _ in seen] == [2, 4] and set(seen[0][1]) == {"eval_loss", "eval_accuracy"}
    assert summary["eval_accuracy"] == accs[-1]


def test_eval_scores_labels_and_adds_tfidf(label_run):
    from tunesmith.finetune.evaluate import evaluate_run, format_table, save_result
    from tunesmith.finetune.generate import load_generator

    run, test_file, _, _ = label_run
    res = evaluate_run(run, test_file, baseline="tfidf", progress=False)
    assert res["labels"] == LABELS and res["mode"] == "score"
    assert set(res["models"]) == {"tuned", "base", "tfidf"}
    for m in res["models"].values():
        assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(m)
    assert res["models"]["tfidf"]["accuracy"] == 1.0  # the words give each class away
    # scoring == the argmax of Generator.score for every record, tuned and base
    gen = load_generator(run)
    prompts = [r["prompt"] for r in res["predictions"]]
    for name, use_adapter in (("tuned", True), ("base", False)):
        best = [LABELS[int(torch.tensor(row).argmax())] for row in gen.score(prompts, LABELS, use_adapter=use_adapter)]
        assert [r["outputs"][name] for r in res["predictions"]] == best
    files = save_result(res, run)
    assert {f.name for f in files} == {"eval.json", "eval_predictions.jsonl", "eval_confusion.png"}
    saved = json.loads((run / "eval.json").read_text())
    assert saved["models"]["base"]["confusion"]["labels"][:3] == LABELS and "predictions" not in saved
    lines = (run / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and set(json.loads(lines[0])["outputs"]) == {"tuned", "base", "tfidf"}
    assert (run / "eval_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "macro_f1" in format_table(res) and "tfidf" in format_table(res)


def test_eval_generate_mode_and_errors(label_run):
    from tunesmith.finetune.evaluate import evaluate_run

    run, test_file, _, _ = label_run
    res = evaluate_run(run, test_file, mode="generate", max_new_tokens=4, compare_base=False, progress=False)
    assert res["mode"] == "generate" and set(res["models"]) == {"tuned"}
    with pytest.raises(ValueError, match="not in the label set"):
        evaluate_run(run, test_file, labels=["billing", "bug"], progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        evaluate_run(run, "tests/fixtures/messages.jsonl", mode="score", progress=False)
