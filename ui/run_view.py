"""The Runs tab: a finished run's config, data report, summary and loss curve; Evaluate and Export as child jobs.

Evaluate runs `tunesmith eval RUN --data FILE` and Export runs `tunesmith merge RUN` / `tunesmith export RUN`
through the server's JobManager, so they queue behind a training job instead of competing with it, and a crash
leaves the app up. Their results are the files the CLI writes (eval.json, RUN/merged, RUN/gguf), read back here.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from tunesmith.finetune import format_table
from tunesmith.resources import resolve_path

from .jobs import Job, JobManager, log_tail
from .pool import ModelPool
from .train_form import data_choices

SUMMARY_KEYS = {"steps": "optimizer steps", "final_loss": "final train loss", "eval_loss": "eval loss",
                "eval_ppl": "eval perplexity", "eval_accuracy": "eval accuracy", "train_time_s": "training time (s)",
                "train_tokens_per_s": "tokens/s", "dtype": "trained weights' dtype", "world_size": "processes"}
_FAST: dict[str, Any] = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")


def show_run(runs_dir: Path, name: str | None) -> tuple[str, str, str, str | None, str]:
    """(summary, data report, config YAML, loss curve image, eval table) of a finished run, from its files."""
    if not name:
        return "No finished run yet: train one in the Train tab.", "", "", None, ""
    run = runs_dir / name
    summary = _json(run / "summary.json")
    rows = [f"| {label} | {summary[k]} |" for k, label in SUMMARY_KEYS.items() if summary.get(k) is not None]
    text = f"### {name}\n\n`{run}`\n\n" + ("| | |\n|---|---|\n" + "\n".join(rows) if rows else "no summary.json")
    if (run / "merged" / "config.json").exists():
        text += "\n\nMerged model: `merged/` (pick it as a base model in the Train tab to continue from it)."
    data = "\n".join(f"- {line}" for line in summary.get("data", [])) or "no data report in summary.json"
    config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    curve = str(run / "loss.png") if (run / "loss.png").exists() else None
    return text, data, config, curve, eval_table(run)


def eval_table(run: Path) -> str:
    """The base-vs-tuned table `tunesmith eval` printed, from the eval.json it wrote."""
    result = _json(run / "eval.json")
    if not result.get("models"):
        return ""
    return f"```\n{format_table(result)}\n```"


def eval_choices(runs_dir: Path, name: str | None, folder: str | None) -> list[tuple[str, str]]:
    """Held-out files: the examples, this session's uploads, and the files the run copied at its start."""
    own = sorted((runs_dir / name / "data").glob("*")) if name else []
    return data_choices(folder) + [(f"{name}'s data: {p.name}", str(p)) for p in own if p.is_file()]


def follow(manager: JobManager, job: Job) -> Iterator[str]:
    """Status lines while a job waits and runs (its place, then its log's last line)."""
    while job.state in ("queued", "running", "stopping"):
        place = manager.place(job)
        last = log_tail(job, 1)
        yield f"{job.label}: " + (f"queued, place {place}" if place else f"{job.state}… {last[-160:]}")
        time.sleep(1.0)
    if job.state == "finished":
        yield f"{job.label}: done. {log_tail(job, 3)}"
    else:
        yield f"⚠️ {job.label} {job.state}. {job.error or log_tail(job, 10)}"


def run_view(pool: ModelPool, manager: JobManager, folder: gr.State, version: gr.Number) -> gr.Dropdown:
    """Lay out the Runs tab inside the current Blocks. `folder` is the Train tab's upload folder (held-out files
    can be uploaded there); `version` changes when a job finishes (the run list is refreshed then). Returns the
    held-out file picker, which the Train tab's uploads update."""
    runs_dir = pool.runs_dir

    def runs_update(current: str | None) -> Any:
        names = pool.runs()
        value = current if current in names else (names[-1] if names else None)
        return gr.Dropdown(choices=names, value=value)

    def picked(name: str | None) -> tuple[Any, ...]:
        if name and name not in pool.runs():  # only names the pool lists reach the disk
            return "Unknown run: press Refresh.", "", "", None, ""
        return show_run(runs_dir, name)

    def held_out(name: str | None, folder_: str | None, current: str | None) -> Any:
        choices = eval_choices(runs_dir, name, folder_)
        return gr.Dropdown(choices=choices, value=current if current in [v for _, v in choices] else None)

    def evaluate(name: str | None, data: str | None, folder_: str | None) -> Iterator[tuple[str, Any]]:
        if not name or name not in pool.runs():
            yield "Pick a finished run first.", gr.skip()
            return
        if not data or data not in [v for _, v in eval_choices(runs_dir, name, folder_)]:
            yield "Pick a held-out file (an example file, or one uploaded in the Train tab).", gr.skip()
            return
        run = runs_dir / name
        path = Path(resolve_path(data))
        if folder_ and path.parent == Path(folder_):  # the session folder goes when the page closes
            (run / "data").mkdir(exist_ok=True)
            path = Path(shutil.copyfile(path, run / "data" / path.name))
        yield from _submit(manager, "eval", name, ["eval", str(run), "--data", str(path)], run,
                           lambda: eval_table(run))

    def export(name: str | None, kind: str) -> Iterator[str]:
        if not name or name not in pool.runs():
            yield "Pick a finished run first."
            return
        run = runs_dir / name
        for status, _ in _submit(manager, kind, name, [kind, str(run)], run, gr.skip):
            yield status

    def merge(name: str | None) -> Iterator[str]:
        yield from export(name, "merge")

    def gguf(name: str | None) -> Iterator[str]:
        yield from export(name, "export")

    with gr.Tab("Runs", elem_id="runs-tab") as tab:
        with gr.Row(equal_height=True):
            runs = pool.runs()
            run_pick = gr.Dropdown(runs, value=runs[-1] if runs else None, label="Finished run",
                                   elem_id="run-pick", scale=4)
            refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="run-refresh")
        with gr.Row():
            with gr.Column():
                summary = gr.Markdown(elem_id="run-summary")
                gr.Markdown("**Data report**")
                data_report = gr.Markdown(elem_id="run-data")
            curve = gr.Image(label="Loss curve", type="filepath", interactive=False, elem_id="run-curve")
        with gr.Accordion("Config (the resolved config.yaml)", open=False):
            config = gr.Code(language="yaml", interactive=False, elem_id="run-config")
        gr.Markdown("#### Evaluate on held-out data (tuned vs base)")
        with gr.Row(equal_height=True):
            eval_file = gr.Dropdown(data_choices(None), value=None, label="Held-out file", elem_id="run-eval-file",
                                    scale=4)
            eval_btn = gr.Button("Evaluate", variant="primary", scale=1, elem_id="run-eval")
        eval_status = gr.Markdown(elem_id="run-eval-status")
        table = gr.Markdown(elem_id="run-eval-table")
        gr.Markdown("#### Export")
        with gr.Row():
            merge_btn = gr.Button("Merge the adapter into the base (RUN/merged)", elem_id="run-merge")
            gguf_btn = gr.Button("Export GGUF (llama.cpp, Ollama)", elem_id="run-gguf")
        export_status = gr.Markdown(elem_id="run-export-status")

    shown = [summary, data_report, config, curve, table]
    run_pick.change(picked, run_pick, shown, **_FAST)
    for trigger in (refresh.click, tab.select, version.change):
        trigger(runs_update, run_pick, run_pick, **_FAST).then(picked, run_pick, shown, **_FAST)
    for trigger in (tab.select, run_pick.change):
        trigger(held_out, [run_pick, folder, eval_file], eval_file, **_FAST)
    eval_btn.click(evaluate, [run_pick, eval_file, folder], [eval_status, table], **_FAST)
    merge_btn.click(merge, run_pick, export_status, **_FAST)
    gguf_btn.click(gguf, run_pick, export_status, **_FAST)
    return eval_file


def _submit(manager: JobManager, kind: Any, name: str, args: list[str], run: Path,
            result: Any) -> Iterator[tuple[str, Any]]:
    try:
        job = manager.submit(kind, name, args, run)
    except ValueError as e:
        yield f"⚠️ {e}", gr.skip()
        return
    status = ""
    for status in follow(manager, job):
        yield status, gr.skip()
    yield status, result() if job.state == "finished" else gr.skip()


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

