"""The Runs tab's reading of a run folder, and Export (merge) as a child job whose result becomes a base model one can
continue training from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunesmith.ui.jobs import JobManager
from tunesmith.ui.pool import ModelPool
from tunesmith.ui.run_view import eval_choices, eval_table, show_run
from tunesmith.ui.train_form import base_choices


def _finished_run(tiny_run_dir: Path, runs: Path) -> Path:
    run = runs / "done"
    shutil.copytree(tiny_run_dir, run)
    (run / "summary.json").write_text(json.dumps({"steps": 12, "final_loss": 1.5, "eval_loss": 1.7,
                                                  "data": ["11 records -> 260 tokens (33 trained on)"]}))
    (run / "data").mkdir()
    (run / "data" / "sums.jsonl").write_text('{"text": "1 plus 1 is 2"}\n')
    return run


def test_run_view_reads_the_run_folder(tiny_run_dir, tmp_path):
    runs = tmp_path / "runs"
    run = _finished_run(tiny_run_dir, runs)
    summary, data, config, curve, table = show_run(runs, "done")
    assert "| optimizer steps | 12 |" in summary and "| eval loss | 1.7 |" in summary
    assert data == "- 11 records -> 260 tokens (33 trained on)" and "base_model" in config
    assert curve is None and table == ""  # no loss.png, no eval yet
    (run / "eval.json").write_text(json.dumps({"records": 3, "data": "held.jsonl", "models": {
        "tuned": {"loss": 1.25, "exact_match": 0.5}, "base": {"loss": 2.5, "exact_match": 0.0}}}))
    table = eval_table(run)
    assert table.splitlines()[2].split() == ["metric", "tuned", "base"]
    assert "exact_match" in table and "0.5000" in table
    assert ("done's data: sums.jsonl", str(run / "data" / "sums.jsonl")) in eval_choices(runs, "done", None)
    assert show_run(runs, None)[0].startswith("No finished run yet")


def test_merge_job_makes_a_base_model_to_continue_from(tiny_run_dir, tmp_path):
    runs = tmp_path / "runs"
    run = _finished_run(tiny_run_dir, runs)
    pool = ModelPool(runs, default=str(run))
    manager = JobManager(env={"OMP_NUM_THREADS": "1"})
    try:
        job = manager.submit("merge", "done", ["merge", str(run)], run)
        assert manager.wait(job, 180) == "finished", job.error
    finally:
        manager.close()
    assert (run / "merged" / "config.json").exists() and "merged model written to" in job.log.read_text()
    assert ("done (merged: continue from it)", str(run / "merged")) in base_choices(pool)
    assert "Merged model: `merged/`" in show_run(runs, "done")[0]
