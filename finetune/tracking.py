"""Experiment tracking: every metrics.jsonl row, the resolved config and the loss curve, also sent to TensorBoard,
MLflow, W&B (or another of Accelerate's trackers) through Accelerate's tracker API, offline by default.

Accelerate does the logging (on the main process only); this module adds what a run folder needs:

| tracker       | where by default                                          | set elsewhere with                  |
|---------------|-----------------------------------------------------------|-------------------------------------|
| `tensorboard` | RUN/tensorboard/tunesmith/ (`tensorboard --logdir RUN`)    | -                                   |
| `mlflow`      | RUN/mlflow.db (SQLite) and RUN/mlartifacts/               | MLFLOW_TRACKING_URI                 |
| `wandb`       | offline, RUN/wandb/ (`wandb sync` uploads it)             | WANDB_MODE, WANDB_API_KEY           |

MLflow's plain-folder store (`file:./mlruns`) refuses to open since MLflow 3.7 unless MLFLOW_ALLOW_FILE_STORE is set,
so the local store is the SQLite file MLflow recommends (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`).

Resume: the trackers hold exactly the rows of metrics.jsonl. TensorBoard continues its folder and purges the steps
past the checkpoint (`purge_step`); MLflow and W&B continue their run (ids kept in RUN/trackers.json) unless steps
past the checkpoint were already logged, which neither can take back: then a new run starts and gets the kept rows
again, so no run ever holds a step twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, config_to_dict, flatten
from .runs import read_metrics

logger = logging.getLogger(__name__)

PROJECT = "tunesmith"
"""The TensorBoard subfolder, the MLflow experiment and the W&B project; each run is named after its folder."""

_EXTRA = "pip install 'tunesmith[trackers]'"
_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", _EXTRA), "mlflow": ("mlflow", _EXTRA), "wandb": ("wandb", "pip install wandb"),
    "trackio": ("trackio", "pip install trackio"), "aim": ("aim", "pip install aim"),
    "comet_ml": ("comet_ml", "pip install comet-ml"), "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"), "swanlab": ("swanlab", "pip install swanlab"),
}
"""Tracker name -> (module it needs, how to install it): the check runs before the model loads, because Accelerate
itself skips a tracker whose package is missing without a word."""

_STATE = "trackers.json"
"""The run folder's record of its MLflow / W&B run ids, so that a resume continues the same runs."""


def _absent(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_installed(names: list[str]) -> None:
    """Stop with the install command when a tracker of `train.report_to` is missing."""
    missing = [n for n in names if _absent(_PACKAGES[n][0])]
    if missing:
        fixes = " and ".join(sorted({_PACKAGES[n][1] for n in missing}))
        raise ConfigError(f"`train.report_to` lists {', '.join(missing)}, which is not installed. Install it with "
                          f"{fixes}, or remove it from train.report_to.")


def accelerator_kwargs(cfg: Config) -> dict[str, Any]:
    """`Accelerator(**accelerator_kwargs(cfg))`: the trackers of `train.report_to`, with the run folder as the
    project folder (TensorBoard writes under RUN/tensorboard). Checks their packages first."""
    names = cfg.train.report_to
    if not names:
        return {}
    check_installed(names)
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}


def start(acc: Any, cfg: Config, out: Path, step: int) -> None:
    """Start the trackers on the main process, at optimizer step `step` (0, or the checkpoint resumed from).

    Call it before metrics.jsonl is trimmed to `step`: rows past `step` are steps the trackers already hold."""
    names = cfg.train.report_to
    if not names or not acc.is_main_process:
        return
    check_installed(names)
    from accelerate.tracking import GeneralTracker

    have = {t.name if isinstance(t, GeneralTracker) else str(t) for t in acc.log_with}  # str(LoggerType.X): its name
    if missing := [n for n in names if n not in have]:
        raise ConfigError(f"`train.report_to` lists {', '.join(missing)}, but the Accelerator passed to setup() was "
                          "made without it: create it with Accelerator(**tracking.accelerator_kwargs(cfg), ...).")
    rows = read_metrics(out / "metrics.jsonl")
    kept = [r for r in rows if r["step"] <= step]
    trimmed = len(kept) < len(rows)  # logged past the checkpoint: a run that cannot forget them is not continued
    state_file = out / _STATE
    state = json.loads(state_file.read_text()) if state_file.exists() and step > 0 else {}
    init: dict[str, dict[str, Any]] = {}
    fresh: set[str] = set(names) - {"tensorboard", "mlflow", "wandb"}
    if "tensorboard" in names:
        tb = out / "tensorboard" / PROJECT
        if tb.exists():  # TensorBoard drops this folder's events at and after purge_step: the trimmed ones
            init["tensorboard"] = {"purge_step": step + 1}
        if step == 0 or not tb.exists():
            fresh.add("tensorboard")
    if "mlflow" in names:
        uri = _mlflow_uri(out)
        init["mlflow"] = {}
        if uri == _local_uri(out):
            init["mlflow"]["logging_dir"] = (out / "mlartifacts").resolve().as_uri()
        if state.get("mlflow_run_id") and state.get("mlflow_uri") == uri and not trimmed:
            init["mlflow"]["run_id"] = state["mlflow_run_id"]
        else:
            init["mlflow"]["run_name"] = out.name
            fresh.add("mlflow")
    if "wandb" in names:
        init["wandb"] = {"name": out.name, "dir": str(out)}
        if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
            init["wandb"]["mode"] = "offline"
        if state.get("wandb_run_id") and not trimmed:
            init["wandb"].update(id=state["wandb_run_id"], resume="allow")
        else:
            fresh.add("wandb")
    acc.init_trackers(PROJECT, config=None, init_kwargs=init)
    # a tracker new to this run gets the config, and on a resume the rows it missed, so its history is complete
    hparams = _hparams(cfg)
    for tracker in acc.trackers:
        if tracker.name in fresh:
            tracker.store_init_configuration(hparams)
            for r in kept:
                tracker.log(_scalars(r), step=r["step"])
    ids = {}
    if "mlflow" in names:
        ids = {"mlflow_run_id": acc.get_tracker("mlflow", unwrap=True).info.run_id, "mlflow_uri": _mlflow_uri(out)}
    if "wandb" in names:
        ids["wandb_run_id"] = acc.get_tracker("wandb", unwrap=True).id
    if ids:
        state_file.write_text(json.dumps(ids, indent=1))


def log(acc: Any, row: dict[str, Any]) -> None:
    """One metrics.jsonl row, at its step (Accelerate logs on the main process only)."""
    if acc.trackers:
        acc.log(_scalars(row), step=row["step"])


def log_files(acc: Any, out: Path, step: int) -> None:
    """The end of a run: the loss curve as an image (TensorBoard, W&B); the curve, config.yaml and summary.json as
    artifacts (MLflow). Other trackers get the metrics and the config only."""
    if not acc.is_main_process:
        return
    png = out / "loss.png"
    for tracker in acc.trackers:
        if tracker.name == "tensorboard" and png.exists():
            tracker.tracker.add_image("loss_curve", _image(png), global_step=step, dataformats="HWC")
            tracker.tracker.flush()
        elif tracker.name == "wandb" and png.exists():
            tracker.log_images({"loss_curve": [_image(png)]}, step=step)
        elif tracker.name == "mlflow":
            for f in (png, out / "config.yaml", out / "summary.json"):
                if f.exists():
                    tracker.log_artifact(str(f))


@contextlib.contextmanager
def ending(acc: Any, cfg: Config) -> Iterator[None]:
    """Close the trackers however training ends: an MLflow run is marked FINISHED, KILLED (stopped by a signal) or
    FAILED. Not `acc.end_training()`, which also destroys the process group that the caller (a sweep, a notebook
    that trains twice) may still use."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except (SystemExit, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        _close(acc, cfg, status)


def _close(acc: Any, cfg: Config, status: str) -> None:
    names = cfg.train.report_to
    for tracker in [t for t in acc.trackers if t.name in names]:
        try:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status)
            else:
                tracker.finish()
        except Exception as e:  # the run folder is complete already; a tracker that fails to close must not fail it
            logger.warning("closing the %s tracker failed: %s", tracker.name, e)
        acc.trackers.remove(tracker)
    if "mlflow" in names and acc.is_main_process:
        import mlflow

        if mlflow.get_tracking_uri() == _local_uri(Path(cfg.output_dir)):
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None unsets it (and MLFLOW_TRACKING_URI)


def _local_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _mlflow_uri(out: Path) -> str:
    """The user's tracking URI if they set one (MLFLOW_TRACKING_URI or mlflow.set_tracking_uri), else the run
    folder's own SQLite store, set here (mlflow.set_tracking_uri also exports it to subprocesses until `_close`)."""
    import mlflow

    if not mlflow.tracking.is_tracking_uri_set():
        mlflow.set_tracking_uri(_local_uri(out))
    return mlflow.get_tracking_uri()


def _hparams(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat `section.key` hyperparameters of the types every tracker takes (TensorBoard's
    add_hparams refuses lists and None: they become JSON text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flatten(config_to_dict(cfg)).items()}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers (booleans as 0/1, `step` being the x axis, None left out)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def _image(png: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))
