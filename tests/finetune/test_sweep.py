"""`tunesmith sweep` on the tiny model: a sweep completes and writes its results, the median pruner stops a worse
trial, a rerun continues the study (an interrupted trial runs again, a finished one never does), bad spaces fail
before any training."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from tunesmith.cli import main
from tunesmith.finetune import ConfigError, load_config, save_config, sweep
from tunesmith.finetune.sweep import sample

ROOT = Path(__file__).parents[2]
REVIEWS = [("a great movie, I loved it", "positive"), ("boring and far too long", "negative"),
           ("the best film of the year", "positive"), ("I want my money back", "negative")]


def _data(tmp_path: Path) -> tuple[Path, Path]:
    """16 two-label training records (the answers form a label set, so evals also log eval_accuracy), and 4 of them
    to validate on (a small eval keeps the test fast; the same distribution keeps the lr effect clear)."""
    rows = [{"messages": [{"role": "user", "content": f"Review {i}: {text}"}, {"role": "assistant", "content": label}]}
            for i in range(4) for text, label in REVIEWS]
    for name, part in (("train.jsonl", rows), ("val.jsonl", rows[:4])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path / "train.jsonl", tmp_path / "val.jsonl"


def _config(model_dir: Path, tmp_path: Path) -> Path:
    train, val = _data(tmp_path)
    cfg = load_config(None, [
        f"base_model={model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train=[{train}]",
        f"data.validation=[{val}]", "data.max_length=64", "train.precision=fp32", "train.max_steps=4",
        "train.micro_batch_size=4", "train.eval_every=2", "train.save_every=0", "train.warmup_steps=0",
        "lora.dropout=0", "seed=0"])
    save_config(cfg, tmp_path / "config.yaml")
    return tmp_path / "config.yaml"


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="tunesmith", storage=f"sqlite:///{out / 'optuna.db'}")


def test_sweep_runs_resumes_and_reruns_an_interrupted_trial(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tiny_model_dir, tmp_path)
    out = tmp_path / "run-sweep"
    assert main(["sweep", str(cfg), "--trials", "1"]) == 0
    assert "eval_accuracy" in capsys.readouterr().out  # labels -> metric auto picks accuracy
    # a process killed mid-trial leaves it RUNNING in the study
    dead = _study(out).ask()
    dead.suggest_float("train.lr", 1e-5, 2e-3, log=True)
    dead.suggest_categorical("lora.r", [8, 16, 32, 64])

    assert main(["sweep", str(cfg), "--trials", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trial 1 was interrupted" in printed and "best: trial" in printed
    trials = _study(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params  # the interrupted settings ran again, as one new trial
    assert trials[2].user_attrs["overrides"]["lora.alpha"] == 2 * trials[2].params["lora.r"]
    for n in (0, 2):
        run = out / "trials" / f"trial-{n}"
        assert (run / "adapter" / "adapter_model.safetensors").exists() and (run / "metrics.jsonl").exists()
        assert load_config(run / "config.yaml").train.lr == pytest.approx(trials[n].params["train.lr"])
    assert not (out / "trials" / "trial-1").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["complete", "interrupted", "complete"]
    header = "| trial | state | eval_accuracy | train.lr | lora.r | lora.alpha | time (s) |"
    assert header in (out / "results.md").read_text()
    best = load_config(out / "best.yaml")  # loadable as a training config; trains into the config's output_dir
    assert best.output_dir == str(tmp_path / "run")

    res = sweep(cfg, trials=2)  # everything is done: nothing runs again
    assert len(_study(out).trials) == 3 and res["best"]["trial"] in (0, 2)
    with pytest.raises(ConfigError, match="another metric"):
        sweep(cfg, trials=3, metric="eval_loss")
    with pytest.raises(ConfigError, match="train.max_steps: 4 -> 5"):
        sweep(cfg, trials=3, overrides=["train.max_steps=5"])


def test_median_pruner_stops_a_worse_trial(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path)
    out = tmp_path / "sweep"
    # settings fixed up front, so the outcome does not hang on the sampler: a useful lr, then one that learns nothing
    out.mkdir()
    study = optuna.create_study(study_name="tunesmith", storage=f"sqlite:///{out / 'optuna.db'}")
    study.enqueue_trial({"train.lr": 1e-2})
    study.enqueue_trial({"train.lr": 1e-7})
    res = sweep(cfg, trials=2, metric="eval_loss", space={"train.lr": {"low": 1e-7, "high": 1e-2, "log": True}},
                out=out, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first, second = _study(out).trials
    assert first.state == TrialState.COMPLETE and sorted(first.intermediate_values) == [2, 4]
    assert second.state == TrialState.PRUNED and second.last_step == 2  # worse than the median at the first eval
    assert second.value > first.intermediate_values[2]
    assert not (out / "trials" / "trial-1" / "adapter").exists()
    assert [r["state"] for r in res["trials"]] == ["complete", "pruned"] and res["best"]["trial"] == 0
    assert load_config(out / "best.yaml").train.lr == pytest.approx(1e-2)


def test_bad_space_and_metric_fail_before_training(tmp_path):
    cfg = tmp_path / "c.yaml"
    save_config(load_config(None, [f"data.train=[{ROOT}/tests/fixtures/messages.jsonl]", "data.val_set_size=1",
                                   "train.max_steps=3", f"output_dir={tmp_path / 'run'}"]), cfg)
    space = tmp_path / "space.yaml"
    space.write_text("train.lrr: {low: 1.0e-5, high: 1.0e-3, log: true}\n")
    with pytest.raises(ConfigError, match=r"space.yaml: `train.lrr: 1e-05` is not a valid setting: unknown key "
                                          r"`train.lrr`. Did you mean `train.lr`"):
        sweep(cfg, trials=1, metric="eval_loss", space=space)
    space.write_text("train.epochs: {low: 1, high: 3, int: true}\n")
    with pytest.raises(ConfigError, match="space.yaml: `train.epochs` is searched, but train.max_steps=3"):
        sweep(cfg, trials=1, metric="eval_loss", space=space)
    with pytest.raises(ConfigError, match="`lora.r` needs `low` and `high`"):
        sweep(cfg, trials=1, metric="eval_loss", space={"lora.r": {"low": 4}})
    with pytest.raises(ConfigError, match="not a label set. Use --metric eval_loss"):
        sweep(cfg, trials=1, metric="eval_accuracy")
    assert not (tmp_path / "run-sweep" / "trials").exists()
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "run-sweep").mkdir(exist_ok=True)
    with open(tmp_path / "run-sweep" / ".lock", "w") as f:  # as another sweep process holds it
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another `tunesmith sweep` is running on this folder"):
            sweep(cfg, trials=1, metric="eval_loss")


def test_full_finetuning_scales_lr_and_skips_lora_keys():
    space = {"finetuning_type": {"choices": ["lora", "full"]}, "train.lr": {"low": 1e-5, "high": 2e-3, "log": True},
             "lora.r": {"choices": [8, 16]}}
    assert sample(FixedTrial({"finetuning_type": "full", "train.lr": 1e-3}), space) == {
        "finetuning_type": "full", "train.lr": pytest.approx(1e-4)}
    assert sample(FixedTrial({"finetuning_type": "lora", "train.lr": 1e-3, "lora.r": 8}), space) == {
        "finetuning_type": "lora", "train.lr": 1e-3, "lora.r": 8, "lora.alpha": 16}


def test_ctrl_c_marks_the_trial_and_a_rerun_runs_its_settings_again(tmp_path, monkeypatch):
    """The trainer turns Ctrl-C into a checkpoint and an exit; the sweep marks that trial and queues its settings."""
    import tunesmith.finetune.trainer as trainer

    cfg = tmp_path / "c.yaml"
    save_config(load_config(None, [f"data.train=[{ROOT}/tests/fixtures/messages.jsonl]", "data.val_set_size=1",
                                   "train.max_steps=3", f"output_dir={tmp_path / 'run'}"]), cfg)

    def stopped(cfg, resume=False, on_eval=None):
        raise SystemExit(143)

    def fake(cfg, resume=False, on_eval=None):  # what train() does for a sweep: report evals, return the summary
        on_eval(2, {"eval_loss": 2.0})
        return {"eval_loss": 1.5}

    monkeypatch.setattr(trainer, "train", stopped)
    with pytest.raises(SystemExit):
        sweep(cfg, trials=2, metric="eval_loss")
    out = tmp_path / "run-sweep"
    first, queued = _study(out).trials
    assert (first.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)
    monkeypatch.setattr(trainer, "train", fake)
    res = sweep(cfg, trials=1, metric="eval_loss")
    assert [(r["state"], r["eval_loss"]) for r in res["trials"]] == [("interrupted", None), ("complete", 1.5)]
    assert res["trials"][1]["settings"] == res["trials"][0]["settings"] and res["best"]["trial"] == 1
    assert _study(out).trials[1].intermediate_values == {2: 2.0}


def test_shipped_search_spaces_are_valid_for_the_quickstart():
    """configs/sweep/*.yaml start from the quickstart config (README "Domain accuracy"): every range end must load."""
    from tunesmith.finetune.sweep import _check_space, load_space

    quickstart = ROOT / "configs" / "quickstart.yaml"
    spaces = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
    assert spaces
    for f in spaces:
        spec, where = load_space(f, load_config(quickstart))
        _check_space(spec, quickstart, where)
