"""`tunesmith sweep`: hyperparameter search with Optuna, where every trial is a normal training run.

Optuna's TPE sampler proposes the next settings from the finished trials; a median pruner stops a trial whose eval
metric (logged every `train.eval_every` steps) is worse than the median of the finished trials at the same step. The
study lives in SQLite inside the sweep folder, so rerunning the same command continues it:

    SWEEP/optuna.db            the Optuna study (what makes the sweep resumable)
    SWEEP/base.yaml            the resolved config every trial starts from
    SWEEP/trials/trial-N/      trial N's run folder (config.yaml, adapter or model, metrics.jsonl, ...)
    SWEEP/results.md, .jsonl   one row per trial: settings, metric, state, time
    SWEEP/best.yaml            the best trial's full config (`tunesmith train SWEEP/best.yaml` retrains it)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import Config, ConfigError, config_to_dict, flatten, load_config, read_yaml, save_config
from .errors import TrainingError

if TYPE_CHECKING:
    import optuna

DIRECTIONS: dict[str, Literal["minimize", "maximize"]] = {
    "eval_loss": "minimize", "eval_accuracy": "maximize", "eval_preference_accuracy": "maximize",
    "eval_reward_mean": "maximize"}

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"low": 1e-5, "high": 2e-3, "log": True},
    "train.epochs": {"low": 1, "high": 10, "int": True},
    "lora.r": {"choices": [8, 16, 32, 64]},
}
"""What matters most when fine-tuning on a small data set. `train.epochs` is left out when `train.max_steps` fixes the
length; with `finetuning_type: full` the lr range is scaled by FULL_LR_SCALE and `lora.r` is left out."""

FULL_LR_SCALE = 0.1
"""Full fine-tuning moves every weight and needs ~10x smaller steps than LoRA. When the space searches
`finetuning_type` and a trial draws `full`, its sampled `train.lr` is multiplied by this (and `lora.*` keys are not
sampled), so one lr range serves both."""

_SPACE_HELP = ("Each key is a dotted config key mapped to {low: 1e-5, high: 2e-3, log: true}, "
               "{low: 1, high: 10, int: true} or {choices: [8, 16, 32]}.")
_STUDY = "tunesmith"


def sweep(config: str | Path | Config, trials: int, metric: str = "auto", space: str | Path | dict | None = None,
          out: str | Path | None = None, overrides: list[str] | None = None, seed: int | None = None,
          pruner: optuna.pruners.BasePruner | None = None) -> dict[str, Any]:
    """Run (or continue) a sweep until `trials` trials have finished; return the results and the best trial.

    `config`: a YAML path (with dotted `overrides`) or a Config. `metric`: `eval_loss`, `eval_accuracy`, or `auto`
    (accuracy when the data are labels). `space`: a YAML file or a mapping in the format of DEFAULT_SPACE.
    `out`: default `<output_dir>-sweep`. `seed`: the sampler's (default: the config's). `pruner`: default a
    MedianPruner that starts pruning once min(5, trials // 4) (at least 1) trials have completed.
    """
    import optuna
    from optuna.trial import TrialState

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tunesmith sweep runs its trials in one process; run it without `accelerate launch`.")
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("sweep(): overrides apply to a YAML path; with a Config, set its fields instead.")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    metric = _pick_metric(cfg, metric)
    spec, where = load_space(space, cfg)
    out = Path(out or f"{cfg.output_dir.rstrip('/')}-sweep")
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our per-trial line says what Optuna's INFO lines say
    with _only_process(out):
        base = _save_base(cfg, out / "base.yaml")
        _check_space(spec, base, where)
        study = optuna.create_study(storage=f"sqlite:///{(out / 'optuna.db').resolve()}", study_name=_STUDY,
                                    direction=DIRECTIONS[metric], load_if_exists=True, pruner=pruner or
                                    optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, trials // 4))))
        _check_same_sweep(study, metric, spec, out)
        # a fresh seed per start: reseeding with the same value would replay the first trials' settings after a resume
        # TPE's default of 10 random trials first would make a CPU-sized sweep (6-12 trials) a random search
        study.sampler = optuna.samplers.TPESampler(seed=(cfg.seed if seed is None else seed) + len(study.trials),
                                                   n_startup_trials=min(10, max(3, trials // 3)))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # we hold the lock: none is alive
            print(f"trial {t.number} was interrupted; its settings run again", flush=True)
            _requeue(study, t.number, t.params)
        done = len(_finished(study))
        print(f"sweep {out}: {done}/{trials} trials done, {DIRECTIONS[metric]} {metric}; space: {', '.join(spec)}"
              + ("" if cfg.train.eval_every > 0 else " (train.eval_every=0: trials are scored only at the end, so "
                                                     "none is pruned)"), flush=True)
        while (done := len(_finished(study))) < trials:
            _run_trial(study, base, spec, metric, out, f"{done + 1}/{trials}")
        return _write_results(study, base, metric, out)


def _run_trial(study: optuna.Study, base: Path, spec: dict[str, dict[str, Any]], metric: str, out: Path,
               progress: str) -> None:
    """One trial: sample, train with the eval metric reported to the pruner, tell Optuna how it ended."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from .trainer import train

    trial = study.ask()
    values = sample(trial, spec)
    trial.set_user_attr("overrides", values)
    run = out / "trials" / f"trial-{trial.number}"
    cfg = load_config(base, [f"{k}={json.dumps(v)}" for k, v in values.items()] + [f"output_dir={run}"])

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        # also called after the final eval (as in Optuna's examples, where the last epoch is reported like the others):
        # a trial pruned there keeps its value in the study, but its folder has no final model
        if metric not in metrics:
            raise ConfigError(_no_labels(base))
        trial.report(metrics[metric], step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {metrics[metric]} at step {step} is worse than the median")

    try:
        summary = train(cfg, on_eval=on_eval)
        if metric not in summary:
            raise ConfigError(f"{run}: no validation examples, so no {metric}. Set data.validation, or a larger "
                              "data.val_set_size.")
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except TrainingError as e:  # diverged: an outcome of these settings (lr too high), not a reason to stop
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
    except BaseException:  # Ctrl-C / SIGTERM (the trainer checkpoints, then exits) or an error: redo it next time
        _requeue(study, trial.number, trial.params)  # failed without an `error`: not counted, its settings rerun
        print(f"\nsweep stopped: trial {trial.number} will run again when you rerun the same command.", flush=True)
        raise
    else:
        study.tell(trial, summary[metric])
    finally:
        gc.collect()  # the next trial loads its own model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row = _row(study.trials[trial.number], metric)
    print(f"trial {progress} (#{trial.number}): {' '.join(f'{k}={_fmt(v)}' for k, v in values.items())} -> "
          f"{row['state']}, {metric} {_fmt_metric(row, metric)} ({_fmt(row['time_s'])} s)", flush=True)


# -- the search space ------------------------------------------------------------------------------------------
def load_space(space: str | Path | dict | None, cfg: Config) -> tuple[dict[str, dict[str, Any]], str]:
    """The validated search space and where it came from (for error messages). None = DEFAULT_SPACE for `cfg`."""
    if space is None:
        where, raw = "default search space", {k: dict(v) for k, v in DEFAULT_SPACE.items()}
        if cfg.train.max_steps > 0:
            del raw["train.epochs"]
        if cfg.finetuning_type == "full":
            del raw["lora.r"]
            raw["train.lr"].update(low=1e-5 * FULL_LR_SCALE, high=2e-3 * FULL_LR_SCALE)
    else:
        where = "search space" if isinstance(space, dict) else str(space)
        raw = space if isinstance(space, dict) else read_yaml(Path(space))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: must be a non-empty mapping of config keys to ranges. {_SPACE_HELP}")
    spec = {str(k): _check_dim(str(k), v, where) for k, v in raw.items()}
    if "train.epochs" in spec and cfg.train.max_steps > 0:
        raise ConfigError(f"{where}: `train.epochs` is searched, but train.max_steps={cfg.train.max_steps} decides "
                          "the length of every run. Set train.max_steps=-1, or remove train.epochs from the space.")
    return spec, where


def _check_dim(key: str, dim: Any, where: str) -> dict[str, Any]:
    if not isinstance(dim, dict):
        raise ConfigError(f"{where}: `{key}` must be a mapping, got {dim!r}. {_SPACE_HELP}")
    if "choices" in dim:
        choices = dim["choices"]
        if set(dim) != {"choices"} or not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: `{key}` needs a non-empty list `choices` and nothing else. {_SPACE_HELP}")
        if any(not isinstance(c, (str, int, float, bool)) for c in choices):
            raise ConfigError(f"{where}: `{key}` choices must be strings, numbers or booleans, got {choices}")
        return {"choices": choices}
    unknown = set(dim) - {"low", "high", "log", "int"}
    if unknown or not {"low", "high"} <= set(dim):
        raise ConfigError(f"{where}: `{key}` needs `low` and `high` (and optionally `log`, `int`), got "
                          f"{sorted(dim)}. {_SPACE_HELP}")
    try:  # PyYAML reads `1e-5` (no dot) as a string
        low, high = float(dim["low"]), float(dim["high"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: `{key}` low/high must be numbers, got {dim['low']!r}, {dim['high']!r}") from None
    log, is_int = dim.get("log", False), dim.get("int", False)
    if not isinstance(log, bool) or not isinstance(is_int, bool):
        raise ConfigError(f"{where}: `{key}` log and int must be true or false, got {log!r}, {is_int!r}")
    if not low < high:
        raise ConfigError(f"{where}: `{key}` needs low < high, got {low} and {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: `{key}` has log: true, so low must be > 0, got {low}")
    if is_int and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: `{key}` has int: true, so low and high must be whole numbers")
    return {"low": int(low) if is_int else low, "high": int(high) if is_int else high, "log": log, "int": is_int}


def _check_space(spec: dict[str, dict[str, Any]], base: Path, where: str) -> None:
    """Every key is a config key, and every end of every range makes a valid config (before any trial trains)."""
    for key, dim in spec.items():
        for value in dim.get("choices") or [dim["low"], dim["high"]]:
            try:
                load_config(base, [f"{key}={json.dumps(value)}"])
            except ConfigError as e:
                why = str(e).removeprefix(f"{base} (+ command-line overrides): ")
                raise ConfigError(f"{where}: `{key}: {value}` is not a valid setting: {why}") from None


def sample(trial: optuna.Trial, spec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings of one trial, as {dotted key: value}.

    Two rules on top of the space: a trial that draws `finetuning_type: full` skips `lora.*` and scales its lr by
    FULL_LR_SCALE; `lora.alpha` follows `lora.r` as 2*r (the usual ratio) unless the space searches it."""
    values: dict[str, Any] = {}
    for key in sorted(spec, key=lambda k: k != "finetuning_type"):  # decided first: the other keys depend on it
        if values.get("finetuning_type") == "full" and key.startswith("lora."):
            continue
        dim = spec[key]
        if "choices" in dim:
            values[key] = trial.suggest_categorical(key, dim["choices"])
        elif dim.get("int"):
            values[key] = trial.suggest_int(key, dim["low"], dim["high"], log=dim.get("log", False))
        else:
            values[key] = trial.suggest_float(key, dim["low"], dim["high"], log=dim.get("log", False))
    if values.get("finetuning_type") == "full" and "train.lr" in values:
        values["train.lr"] *= FULL_LR_SCALE
    if "lora.r" in values and "lora.alpha" not in spec:
        values["lora.alpha"] = 2 * values["lora.r"]
    return values


# -- the metric and the sweep folder ---------------------------------------------------------------------------
def _pick_metric(cfg: Config, metric: str) -> str:
    """`auto` -> eval_accuracy when the data are labels, else eval_loss; both need validation data."""
    if metric not in (*DIRECTIONS, "auto"):
        raise ConfigError(f"--metric must be one of {', '.join(DIRECTIONS)} or auto, got {metric!r}")
    if not cfg.data.validation and cfg.data.val_set_size <= 0:
        raise ConfigError("tunesmith sweep scores each trial on validation data, but data.validation is empty and "
                          "data.val_set_size=0. Set data.validation (a file) or data.val_set_size (e.g. 0.1).")
    if cfg.method != "sft":  # what each method's evals log (finetune/methods.py): pairs rank, GRPO rewards
        logged = {"kto": ["eval_loss"], "grpo": ["eval_reward_mean"]}.get(cfg.method,
                                                                          ["eval_preference_accuracy", "eval_loss"])
        if metric not in (*logged, "auto"):
            raise ConfigError(f"--metric {metric}: method {cfg.method} logs {' and '.join(logged)}; pick one.")
        return logged[0] if metric == "auto" else metric
    if metric == "eval_loss":
        return metric
    has_labels = _has_labels(cfg)
    if metric == "auto":
        return "eval_accuracy" if has_labels else "eval_loss"
    if not has_labels:
        raise ConfigError(_no_labels(cfg.data.train))
    return metric


def _has_labels(cfg: Config) -> bool:
    """The trainer's own test: do the training answers (validation held out) form a label set?"""
    from .data import load_records, prompts_and_answers, split_validation
    from .metrics import resolve_labels

    recs = load_records(cfg.data.train)
    if not cfg.data.validation:
        recs, _ = split_validation(recs, cfg.data.val_set_size, cfg.seed)
    return resolve_labels(cfg.data.labels, prompts_and_answers(recs, cfg.data)[1]) is not None


def _no_labels(where: Any) -> str:
    return (f"--metric eval_accuracy needs classification data, but the answers in {where} are not a label set. "
            "Use --metric eval_loss, or list the labels in the config (data.labels: ['yes', 'no'], quoted: YAML "
            "reads a bare yes as true).")


def _save_base(cfg: Config, path: Path) -> Path:
    """Write the config every trial starts from; on a rerun, refuse a changed one (its trials would not compare)."""
    new = config_to_dict(cfg)
    if path.exists():
        old = read_yaml(path)
        changed = _changed_keys(old, new)
        if changed:
            raise ConfigError(f"{path.parent} is a sweep of another config ({', '.join(changed)} differ from {path}). "
                              "Rerun with the same config and overrides, or pass --out for a new sweep.")
    else:
        save_config(cfg, path)
    return path


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check_same_sweep(study: optuna.Study, metric: str, spec: dict[str, dict[str, Any]], out: Path) -> None:
    """A rerun continues the same search: same metric, same space (a study started elsewhere gets ours)."""
    for name, value in (("metric", metric), ("space", spec)):
        old = study.user_attrs.get(name)
        if old is None:
            study.set_user_attr(name, value)
        elif old != value:
            flag = f"--metric {old}" if name == "metric" else "the same --space file"
            raise ConfigError(f"{out} was started with another {name} ({old}). Rerun with {flag}, or pass --out "
                              "for a new sweep.")


@contextlib.contextmanager
def _only_process(out: Path) -> Iterator[None]:
    """One sweep process per folder: a trial still RUNNING at start is then known to be dead, not busy elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; do not start two sweeps on one folder
        yield
        return
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another `tunesmith sweep` is running on this folder. Wait for it to finish, "
                              "or pass --out for another sweep.") from None
        yield


# -- trial states and results ---------------------------------------------------------------------------------
def _finished(study: optuna.Study) -> list[Any]:
    """Trials that count towards --trials: complete, pruned, or failed by their settings (a diverged run records an
    `error`). An interrupted trial is failed without one, and its settings run again."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


def _requeue(study: optuna.Study, number: int, params: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(params, user_attrs={"rerun_of": number})


def _row(t: optuna.trial.FrozenTrial, metric: str) -> dict[str, Any]:
    state = t.state.name.lower()
    if state == "fail":
        state = "failed" if "error" in t.user_attrs else "interrupted"
    ended, began = t.datetime_complete, t.datetime_start
    return {"trial": t.number, "state": state, metric: t.value, "step": t.last_step,
            "settings": t.user_attrs.get("overrides") or t.params,
            "time_s": round((ended - began).total_seconds(), 1) if ended and began else None,
            "error": t.user_attrs.get("error")}


def _write_results(study: optuna.Study, base: Path, metric: str, out: Path) -> dict[str, Any]:
    """results.jsonl and results.md from the study (the one record of the sweep), best.yaml, the table on stdout."""
    from optuna.trial import TrialState

    rows = [_row(t, metric) for t in study.trials if t.state != TrialState.WAITING]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    lines = [["trial", "state", metric, *keys, "time (s)"]]
    lines.append(["---"] * len(lines[0]))
    lines += [[str(r["trial"]), r["state"], _fmt_metric(r, metric), *(_fmt(r["settings"].get(k)) for k in keys),
               _fmt(r["time_s"])] for r in rows]
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    (out / "results.md").write_text(f"# Sweep: {study.direction.name.lower()} {metric}\n\n{table}\n")
    print(table)
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        print("no trial has completed, so there is no best.yaml yet")
        return {"out": str(out), "metric": metric, "best": None, "trials": rows}
    bt = study.best_trial
    settings = bt.user_attrs.get("overrides") or bt.params
    cfg = load_config(base, [f"{k}={json.dumps(v)}" for k, v in settings.items()])  # output_dir: the user's own
    save_config(cfg, out / "best.yaml")
    best = {"trial": bt.number, metric: bt.value, "settings": settings, "run": str(out / "trials" /
            f"trial-{bt.number}"), "config": str(out / "best.yaml")}
    print(f"best: trial {bt.number}, {metric} {_fmt(bt.value)}, run folder {best['run']}\n"
          f"its config: {best['config']} (`tunesmith train {best['config']}` retrains it into {cfg.output_dir})")
    return {"out": str(out), "metric": metric, "best": best, "trials": rows}


def _fmt(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_metric(row: dict[str, Any], metric: str) -> str:
    return f"{_fmt(row[metric])} @ step {row['step']}" if row["state"] == "pruned" else _fmt(row[metric])
