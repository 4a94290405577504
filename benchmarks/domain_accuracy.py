"""Does fine-tuning beat the classical baseline? Recipes vs TF-IDF + logistic regression on Debian package sections.

For each training size (examples per class) every recipe trains a run on the same pool and is evaluated on the same
600 held-out records (label scoring, so every answer is a label); the TF-IDF column is trained on the same pool in
the same call (`tunesmith eval --baseline tfidf`). Accuracy is not timing, but the CPU seconds per run are printed
so the cost of a recipe is visible.

    python benchmarks/domain_accuracy.py                      # all sizes, quickstart vs the classify recipe
    python benchmarks/domain_accuracy.py --sizes 50 --recipes quickstart,lora8,classify   # the recipe comparison
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "debian_sections"
RECIPES = {
    "quickstart": ["configs/quickstart.yaml"],
    "classify": ["configs/smollm2-135m_classify.yaml"],
    "lora8": ["configs/quickstart.yaml", "train.epochs=8"],  # the quickstart with 4x the updates
}
"""name -> [config, overrides...]; data paths and output_dir are set per size."""


def run_one(name: str, spec: list[str], size: int, out_root: Path, base: bool) -> dict:
    from tunesmith.finetune import evaluate_run, load_config, train

    out = out_root / f"{name}-{size}"
    cfg = load_config(ROOT / spec[0], [*spec[1:], f"data.train=[{DATA / f'train_{size}.jsonl'}]",
                                       f"output_dir={out}"])
    t0 = time.time()
    if not (out / "summary.json").exists():
        train(cfg)
    train_s = time.time() - t0
    res = evaluate_run(out, DATA / "test.jsonl", baseline="tfidf", compare_base=base, mode="score")
    row = {"recipe": name, "per_class": size, "train_s": round(train_s, 1),
           **{f"{m}_acc": res["models"][m]["accuracy"] for m in res["models"]},
           **{f"{m}_f1": res["models"][m]["macro_f1"] for m in res["models"]}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20,50,150")
    ap.add_argument("--recipes", default="quickstart,classify")
    ap.add_argument("--out", default="runs/domain")
    a = ap.parse_args()
    rows = []
    for size in [int(x) for x in a.sizes.split(",")]:
        for i, name in enumerate(a.recipes.split(",")):
            rows.append(run_one(name, RECIPES[name], size, Path(a.out), base=i == 0))
    print("\n| recipe | examples/class | tuned acc | macro-F1 | TF-IDF acc | vs TF-IDF | base acc | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['per_class']} | {r['tuned_acc']:.1%} | {r['tuned_f1']:.3f} | "
              f"{r['tfidf_acc']:.1%} | {100 * (r['tuned_acc'] - r['tfidf_acc']):+.1f} pts | "
              f"{r['base_acc']:.1%} | {r['train_s']:.0f} |" if "base_acc" in r else
              f"| {r['recipe']} | {r['per_class']} | {r['tuned_acc']:.1%} | {r['tuned_f1']:.3f} | "
              f"{r['tfidf_acc']:.1%} | {100 * (r['tuned_acc'] - r['tfidf_acc']):+.1f} pts | - | {r['train_s']:.0f} |")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "domain_accuracy.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
