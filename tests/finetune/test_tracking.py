"""Experiment tracking (`train.report_to`): what TensorBoard's event files and the MLflow store hold, read back with
their own readers, equals metrics.jsonl, also across a stop + resume and a resume that trims logged steps; config
validation; a missing package stops before the model loads, naming what to install."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tunesmith.finetune import tracking, trainer
from tunesmith.finetune.config import ConfigError, load_config
from tunesmith.finetune.trainer import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[2]
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json]"


def _cfg(model_dir, out, *extra):
    return load_config(None, [
        f"base_model={model_dir}", f"output_dir={out}", f"data.train={DATA}", f"data.validation={DATA}",
        "data.max_length=64", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=6", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_every=2", "train.save_every=0", "lora.r=4", "seed=0",
        "train.report_to=[tensorboard, mlflow]", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {metric: [(step, value), ...]}: what every tracker must hold."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in _rows(out):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                series.setdefault(k, []).append((r["step"], float(v)))
    return series


def _tensorboard(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard" / tracking.PROJECT), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(tracking.PROJECT).experiment_id],
                              order_by=["attributes.start_time ASC"])
    current = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    return client, runs, current


def _check_trackers_equal_metrics(out: Path, run_id: str, client) -> None:
    expected = _expected(out)
    assert {"loss", "lr", "eval_loss", "tokens_per_s"} <= set(expected)
    ea = _tensorboard(out)
    assert set(expected) <= set(ea.Tags()["scalars"])
    for key, points in expected.items():
        tb = [(e.step, e.value) for e in ea.Scalars(key)]
        assert [s for s, _ in tb] == [s for s, _ in points], key  # each step once: nothing duplicated or lost
        assert [v for _, v in tb] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 events
        ml = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert ml == points, key  # MLflow keeps float64: exact
    assert "loss_curve" in ea.Tags()["images"]


def test_tensorboard_and_mlflow_hold_every_metrics_row(tiny_model_dir, tmp_path, monkeypatch):
    import mlflow
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, out))
    client, runs, current = _mlflow(out)
    assert [r.info.run_id for r in runs] == [current]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["lora.r"] == "4"
    assert json.loads(run.data.params["train.report_to"]) == ["tensorboard", "mlflow"]
    assert {a.path for a in client.list_artifacts(current)} >= {"loss.png", "config.yaml", "summary.json"}
    assert (out / "mlartifacts").is_dir()  # artifacts stay in the run folder too
    _check_trackers_equal_metrics(out, current, client)
    (hp,) = (out / "tensorboard" / tracking.PROJECT).glob("*/hparams.yml")  # the config, once
    assert yaml.safe_load(hp.read_text())["train.max_steps"] == 6
    # the run folder's store was set for this run only: the next mlflow call in this process is the user's again
    assert not mlflow.tracking.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ


def test_stop_and_resume_continue_the_same_runs(tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM at step 2 checkpoints there (nothing logged past it): the resume continues the TensorBoard folder
    and the MLflow run, which end up holding steps 1-6 once each, as metrics.jsonl does."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"

    def stop(step: int, metrics: dict) -> None:
        assert callable(signal.getsignal(signal.SIGTERM)), "fit's handler is not installed: SIGTERM would end pytest"
        os.kill(os.getpid(), signal.SIGTERM)  # what `tunesmith train` gets from the UI's Stop

    with pytest.raises(SystemExit):
        fit(setup(_cfg(tiny_model_dir, out)), on_eval=stop)
    client, runs, first = _mlflow(out)
    assert runs[0].info.status == "KILLED"
    assert max(r["step"] for r in _rows(out)) == 2
    fit(setup(_cfg(tiny_model_dir, out), resume=True), resume=True)
    client, runs, current = _mlflow(out)
    assert current == first and len(runs) == 1
    assert client.get_run(current).info.status == "FINISHED"
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    _check_trackers_equal_metrics(out, current, client)


def test_resume_past_logged_steps_logs_no_step_twice(tiny_model_dir, tmp_path, monkeypatch):
    """What a killed run leaves: steps logged after its last checkpoint. TensorBoard purges them from the folder it
    continues; MLflow cannot, so a new run starts with the kept rows, and the old one is left as it was."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    extra = ("train.save_every=2", "train.keep_checkpoints=5")
    train(_cfg(tiny_model_dir, out, *extra))  # checkpoints at steps 2 and 4; metrics to step 6
    before = _rows(out)
    fit(setup(_cfg(tiny_model_dir, out, *extra), resume=True), resume=True)  # from step 4: steps 5, 6 again
    client, runs, current = _mlflow(out)
    assert len(runs) == 2 and runs[1].info.run_id == current
    assert [r["step"] for r in _rows(out)] == [r["step"] for r in before]
    _check_trackers_equal_metrics(out, current, client)


def test_report_to_validation():
    assert load_config(None).train.report_to == []
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[mlflow, tensorboard, mlflow]"]).train.report_to == ["mlflow",
                                                                                                   "tensorboard"]
    assert load_config(None, ["train.report_to=none"]).train.report_to == []
    with pytest.raises(ConfigError, match=r"`train.report_to` names unknown tracker\(s\) \['tensorbord'\]; use some "
                                          r"of: tensorboard, mlflow, wandb"):
        load_config(None, ["train.report_to=[tensorbord]"])


@pytest.mark.parametrize(("missing", "fix"), [("mlflow", "pip install 'tunesmith[trackers]'"),
                                              ("wandb", "pip install wandb")])
def test_missing_tracker_package_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, missing, fix):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(tracking, "_absent", lambda module: module == missing)
    monkeypatch.setattr(trainer, "load_tokenizer", no_model)
    monkeypatch.setattr(trainer, "load_base_model", no_model)
    cfg = _cfg(tiny_model_dir, tmp_path / "run", "train.report_to=[tensorboard, mlflow, wandb]")
    with pytest.raises(ConfigError, match=re.escape(f"`train.report_to` lists {missing}, which is not installed. "
                                                    f"Install it with {fix}")):
        setup(cfg)
    assert not (tmp_path / "run").exists()


class _FakeAccelerator:
    """Records what `tracking.start` asks Accelerate for (wandb is not installed here, and must never go online)."""

    is_main_process = True

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.log_with, self.trackers, self.calls = ["wandb"], [], []
        self.run = SimpleNamespace(id="abc123")

    def init_trackers(self, project, config=None, init_kwargs=None):
        from types import SimpleNamespace

        self.calls.append(init_kwargs["wandb"])
        self.trackers = [SimpleNamespace(name="wandb", store_init_configuration=lambda values: None,
                                         log=lambda values, step: None)]

    def get_tracker(self, name, unwrap=False):
        return self.run


def test_wandb_is_offline_in_the_run_folder_unless_configured(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_absent", lambda module: False)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.report_to=wandb"])
    out = tmp_path / "run"
    out.mkdir()
    acc = _FakeAccelerator()
    tracking.start(acc, cfg, out, 0)
    assert acc.calls[-1] == {"name": "run", "dir": str(out), "mode": "offline"}
    assert json.loads((out / "trackers.json").read_text()) == {"wandb_run_id": "abc123"}
    tracking.start(acc, cfg, out, 3)  # a resume with nothing logged past the checkpoint continues the run
    assert acc.calls[-1] == {"name": "run", "dir": str(out), "mode": "offline", "id": "abc123", "resume": "allow"}
    monkeypatch.setenv("WANDB_API_KEY", "set-by-the-user")
    tracking.start(acc, cfg, out, 0)
    assert "mode" not in acc.calls[-1]
