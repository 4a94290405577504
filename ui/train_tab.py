"""The Train tab: pick a base model and data, see what will be trained on, set the main hyperparameters, start.

Training runs in a child process through the server's one `JobManager` (ui/jobs.py); this tab is layout and events
only. The form and the YAML come from `ui/train_form.py`, the Runs tab (a finished run's view) from
`ui/run_view.py`. Per session: the upload folder and the config the form started from; everything about jobs is the
server's, so a reload or a second browser shows the same running job.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from tunesmith.finetune import USER_ERRORS, Config

from .jobs import CLI, Job, JobManager, log_tail, progress
from .pool import ModelPool
from .run_view import run_view
from .train_form import (
    ADAPTERS,
    DATA_SUFFIXES,
    FORM_KEYS,
    MAX_DATA_BYTES,
    DataView,
    apply_form,
    base_choices,
    check,
    check_sources,
    copy_uploads,
    data_choices,
    error_markdown,
    form_values,
    inspect_data,
    load_shipped,
    methods,
    new_session_folder,
    offered,
    parse_yaml,
    preview_html,
    remove_session_folder,
    shipped_configs,
    store_data,
    to_yaml,
)

START_CONFIG = "quickstart"
POLL_S = 1.0
"""How often an open page reads the job's files (metrics.jsonl, the log)."""
PREVIEW_KEYS = ("base_model", "data.train", "data.max_length")
"""Form fields whose change re-tokenizes the data for the report and the preview."""
_FAST: dict[str, Any] = dict(concurrency_limit=None, show_progress="hidden", api_visibility="private")


def train_tab(pool: ModelPool, manager: JobManager | None = None) -> gr.Number:
    """Lay out the Train and Runs tabs inside the current Blocks; return a hidden number that changes each time a
    job finishes, so the app refreshes its model lists (a new run is chattable at once)."""
    manager = manager or JobManager()
    runs_dir = pool.runs_dir
    views: OrderedDict[tuple[Any, ...], DataView] = OrderedDict()
    views_lock = threading.Lock()
    computing: dict[tuple[Any, ...], threading.Lock] = {}
    tickets = itertools.count()
    latest: dict[str | None, int] = {}
    """session -> its latest preview request (a number from `tickets`)."""
    first_raw = load_shipped(START_CONFIG)
    first = form_values(first_raw, runs_dir)

    def form_dict(values: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip([*FORM_KEYS, "name"], values))

    def current_raw(raw: dict[str, Any], values: tuple[Any, ...]) -> dict[str, Any]:
        return apply_form(raw, form_dict(values), runs_dir)

    def validated(raw: dict[str, Any], folder: str | None) -> tuple[Config | None, str]:
        problem = check_sources(raw, pool, folder)
        if problem:
            return None, problem
        return check(raw, Path(folder or new_session_folder()))

    def fill(raw: dict[str, Any], folder: str | None, note: str = "") -> list[Any]:
        """Every form field (with fresh choices), the YAML and the download, from a config mapping."""
        v = form_values(raw, runs_dir)
        data = data_choices(folder)
        out: list[Any] = [
            gr.Dropdown(choices=base_choices(pool), value=v["base_model"]),
            v["adapter"], v["method"],
            gr.Dropdown(choices=data, value=v["data.train"]), gr.Dropdown(choices=data, value=v["data.validation"]),
            v["train.epochs"], v["train.max_steps"], v["train.lr"], v["lora.r"], v["lora.alpha"],
            v["lora.target_modules"], v["data.max_length"], v["data.packing"], v["train.precision"], v["name"],
        ]
        return [raw, *out, *shown_yaml(raw, folder, note)]

    def shown_yaml(raw: dict[str, Any], folder: str | None, note: str = "") -> list[Any]:
        """The YAML box, the download file and the message under the form for the config `raw` (form applied)."""
        folder = folder or new_session_folder()
        _, problem = validated(raw, folder)
        path = Path(folder) / f"{Path(str(raw.get('output_dir', 'run'))).name}.yaml"
        path.write_text(to_yaml(raw))
        return [to_yaml(raw), gr.DownloadButton(value=str(path)), error_markdown(problem) or note]

    # -- form <-> YAML ----------------------------------------------------------------------------------------
    def start_from(name: str, folder: str | None) -> list[Any]:
        folder = folder or new_session_folder()
        raw, notes = offered(load_shipped(name), pool, folder)
        return [folder, *fill(raw, folder, f"Started from the shipped config `{name}`" + _changes(notes))]

    def edited(raw: dict[str, Any], folder: str | None, *values: Any) -> list[Any]:
        return shown_yaml(current_raw(raw, values), folder)

    def from_yaml(text: str, folder: str | None) -> list[Any]:
        """The YAML box (edited, or a loaded file) into the form; keys the form lacks are kept as written."""
        folder = folder or new_session_folder()
        try:
            raw = parse_yaml(text, Path(folder))
        except USER_ERRORS as e:
            return [folder, *[gr.skip()] * (len(FORM_KEYS) + 4), error_markdown(str(e))]
        # a YAML names its own output_dir; the run still goes to this server's runs folder under that name
        raw["output_dir"] = str(runs_dir / Path(str(raw.get("output_dir", "runs/run"))).name)
        raw, notes = offered(raw, pool, folder)
        return [folder, *fill(raw, folder, "Loaded into the form" + _changes(notes))]

    def load_file(path: str | None, folder: str | None) -> list[Any]:
        if not path or Path(path).stat().st_size > 1_000_000:
            return [folder, *[gr.skip()] * (len(FORM_KEYS) + 4), "⚠️ A YAML config is a small text file (< 1 MB)."]
        return from_yaml(Path(path).read_text(errors="replace"), folder)

    # -- data ---------------------------------------------------------------------------------------------------
    def upload(files: list[str] | None, folder: str | None, train: list[str] | None) -> list[Any]:
        folder = folder or new_session_folder()
        report = store_data(list(files or []), folder)
        data = data_choices(folder)
        fresh = [str(Path(folder) / line.split(":")[0]) for line in report if ": uploaded" in line]
        # what was just uploaded is trained on, instead of the example data a shipped config starts with
        picked = list(dict.fromkeys([*(f for f in train or [] if not f.startswith("examples/")), *fresh]))
        return [folder, "\n".join(f"- {line}" for line in report), None, gr.Dropdown(choices=data, value=picked),
                gr.Dropdown(choices=data), gr.Dropdown(choices=data)]

    def data_view(cfg: Config) -> DataView:
        key = (cfg.base_model, tuple(cfg.data.train), cfg.data.max_length, cfg.data.format, cfg.data.chat_template,
               cfg.data.system_prompt, cfg.data.train_on_prompt, cfg.data.on_bad_record)
        with views_lock:
            key_lock = computing.setdefault(key, threading.Lock())
        with key_lock:  # the same files asked for twice at once (two events of one change) are read once
            with views_lock:
                if key in views:
                    views.move_to_end(key)
                    return views[key]
            view = inspect_data(cfg)
            with views_lock:
                views[key] = view
                computing.pop(key, None)
                while len(views) > 4:
                    views.popitem(last=False)
        return view

    def preview(request: gr.Request, raw: dict[str, Any], folder: str | None, index: float,
                *values: Any) -> tuple[Any, ...]:
        """Detected format, counts and record `index` with its trained tokens marked, for the form's config. Only
        the session's latest request is shown: an earlier one still tokenizing a big file must not overwrite it."""
        ticket = next(tickets)
        latest[request.session_hash] = ticket
        shown = _preview(raw, folder, index, *values)
        return shown if latest.get(request.session_hash) == ticket else (gr.skip(),) * 3

    def _preview(raw: dict[str, Any], folder: str | None, index: float, *values: Any) -> tuple[Any, ...]:
        cfg, problem = validated(current_raw(raw, values), folder)
        if cfg is None:
            return error_markdown(problem), "", gr.skip()
        try:
            view = data_view(cfg)
        except USER_ERRORS as e:
            return f"⚠️ {e}", "", gr.skip()
        n = len(view.examples)
        shown = preview_html(view, int(index or 0)).replace(f"{folder}/", "")  # the upload's name, not its path
        return view.report, shown, gr.Number(maximum=max(0, n - 1))

    def estimate(raw: dict[str, Any], folder: str | None, *values: Any) -> Any:
        return gr.Textbox(value=_estimate(raw, folder, *values), visible=True)

    def _estimate(raw: dict[str, Any], folder: str | None, *values: Any) -> str:
        """`tunesmith train --dry-run` in a child process: two real steps measure time per step and peak memory."""
        folder = folder or new_session_folder()
        cfg, problem = validated(current_raw(raw, values), folder)
        if cfg is None:
            return problem
        r = subprocess.run([*CLI, "train", str(Path(folder) / "train.yaml"), "--dry-run"], capture_output=True,
                           text=True, timeout=1800, env=manager.env)
        return r.stdout.strip() if r.returncode == 0 else f"dry run failed (exit code {r.returncode}):\n" + \
            "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])

    # -- jobs -------------------------------------------------------------------------------------------------
    def start(raw: dict[str, Any], folder: str | None, *values: Any) -> tuple[Any, str]:
        folder = folder or new_session_folder()
        raw = current_raw(raw, values)
        cfg, problem = validated(raw, folder)
        if cfg is None:
            return gr.skip(), error_markdown(problem)
        out = Path(cfg.output_dir)
        if (out / "adapter").exists() or (out / "model").exists():
            return gr.skip(), error_markdown(f"`output_dir`: {out.name} already holds a finished run. Pick another "
                                             "Run name.")
        # an unfinished run of that name (stopped before the server restarted) is continued, not started over; the
        # trainer refuses a resume whose config differs, with the keys that changed
        resume = bool(list(out.glob("checkpoints/step-*/state.pt")))
        busy = [j for j in manager.jobs() if j.out == out and j.state in ("queued", "running", "stopping")]
        if busy:
            return gr.skip(), error_markdown(f"`output_dir`: {busy[0].label} is {busy[0].state}: pick another name.")
        raw = copy_uploads(raw, folder, out)
        path = out / "ui_config.yaml"  # what the tab submitted; the trainer writes the resolved config.yaml
        path.write_text(to_yaml(raw))
        job = manager.submit("train", out.name, ["train", str(path)], out, resume=resume)
        place = manager.place(job)
        what = "Resuming the unfinished run" if resume else "Started"
        return picker(job), f"{what} {job.label}." if place is None else f"{job.label} queued: place {place}."

    def picker(job: Job | None) -> Any:
        jobs = manager.jobs()
        return gr.Dropdown(choices=[(f"{j.label} · {j.state}", str(j.id)) for j in reversed(jobs)],
                           value=str(job.id) if job else None)

    def selected(job_id: str | None) -> Job | None:
        return manager.get(job_id) if job_id else manager.current()

    def stop(job_id: str | None) -> str:
        job = selected(job_id)
        return manager.stop(job) if job else "No job to stop."

    def resume(job_id: str | None) -> str:
        job = selected(job_id)
        if job is None:
            return "No job to resume."
        try:
            manager.resume(job)
        except ValueError as e:
            return f"⚠️ {e}"
        place = manager.place(job)
        return f"Resuming {job.label}." if place is None else f"{job.label} queued again: place {place}."

    def tick(job_id: str | None, last: tuple[Any, ...] | None, version: float | None) -> list[Any]:
        """The live view: status, curve and log of the selected job (else the server's current one). Parts that did
        not change are skipped, so an open page costs little."""
        job = selected(job_id)
        jobs = manager.jobs()
        listing = tuple((j.id, j.state) for j in jobs)
        version_out = manager.finished if manager.finished != (version or 0) else gr.skip()
        if job is None:
            return [gr.skip() if last and last[0] == listing else picker(job), "No training job yet.", gr.skip(),
                    gr.skip(), gr.Button(interactive=False), gr.Button(interactive=False), (listing,), version_out]
        p = progress(job) if job.kind == "train" else None
        tail = log_tail(job, 25)
        sig = (listing, job.id, job.state, len(p.losses) if p else 0, len(p.eval_losses) if p else 0, tail)
        if last == sig:
            return [gr.skip()] * 6 + [last, version_out]
        place = manager.place(job)
        status = f"**{job.label}**: {job.state}" + (f", place {place} in the queue" if place else "")
        if p is not None and job.state not in ("queued", "cancelled"):
            status += f"\n\n{p.line()}"
        if job.error:  # its exit code, and the log's last line: the CLI's one-line `error: ...` when it is one
            lines = job.error.splitlines()
            status += f"\n\n**Failed** ({lines[0].split('.')[0]}): {lines[-1]}" + " (the log below has more)"
        if job.state == "stopping":
            status += "\n\nSaving a checkpoint after the current step; press Stop again to kill it at once."
        if job.state == "finished" and job.kind == "train":
            status += f"\n\nFinished: **{job.name}** is in the chat's model lists and in the Runs tab."
        active = job.state in ("queued", "running", "stopping")
        return [picker(job) if not last or last[0] != listing else gr.skip(), status,
                _curve(p) if p and (not last or last[3:5] != sig[3:5] or last[1] != sig[1]) else gr.skip(), tail,
                gr.Button(interactive=active), gr.Button(interactive=job.kind == "train" and job.state in
                                                         ("stopped", "failed", "cancelled")), sig, version_out]

    # -- layout -------------------------------------------------------------------------------------------------
    data0 = data_choices(None)
    with gr.Tab("Train", elem_id="train-tab"):
        folder = gr.State(new_session_folder, delete_callback=remove_session_folder)  # made per page load
        raw = gr.State(first_raw)
        gr.Markdown("Fine-tune on your own data: pick a base model and files, check the preview, start. Training "
                    "runs in its own process (one job at a time on this server; others queue).")
        with gr.Row(equal_height=True):
            config_pick = gr.Dropdown(shipped_configs(), value=START_CONFIG, label="Start from a shipped config",
                                      elem_id="train-config", scale=3)
            yaml_upload = gr.UploadButton("Load a YAML config", file_types=[".yaml", ".yml"], size="sm", scale=1,
                                          elem_id="train-yaml-upload")
        with gr.Row():
            base = gr.Dropdown(base_choices(pool), value=first["base_model"], label=FORM_KEYS["base_model"],
                               elem_id="train-base", scale=3)
            name = gr.Textbox(first["name"], label="Run name (a folder in the runs folder)", elem_id="train-name",
                              scale=2)
        files = gr.File(file_count="multiple", label=f"Upload data ({', '.join(DATA_SUFFIXES)}; up to "
                        f"{MAX_DATA_BYTES // 2**20} MB each; kept for this session, read as records only)",
                        elem_id="train-files", height=110)
        upload_report = gr.Markdown(elem_id="train-upload-report")
        with gr.Row():
            train_files = gr.Dropdown(data0, value=first["data.train"], multiselect=True, label=FORM_KEYS["data.train"],
                                      elem_id="train-data", scale=3)
            val_files = gr.Dropdown(data0, value=first["data.validation"], multiselect=True, scale=2,
                                    label="Validation data (optional: else data.val_set_size is held out)",
                                    elem_id="train-val")
        with gr.Accordion("Data: detected format, counts and what is trained on", open=True):
            data_report = gr.Markdown("Upload or pick training data to see its format, counts and what is trained "
                                      "on.", elem_id="train-data-report")
            record = gr.Number(0, precision=0, minimum=0, label="Record to preview", elem_id="train-record")
            preview_box = gr.HTML(elem_id="train-preview")
        with gr.Row():
            adapter = gr.Dropdown(list(ADAPTERS), value=first["adapter"], label=FORM_KEYS["adapter"],
                                  elem_id="train-adapter")
            method = gr.Dropdown(methods(), value=first["method"], label=FORM_KEYS["method"], elem_id="train-method",
                                 visible=len(methods()) > 1)
            epochs = gr.Number(first["train.epochs"], label=FORM_KEYS["train.epochs"], elem_id="train-epochs")
            max_steps = gr.Number(first["train.max_steps"], precision=0, label="Max steps (-1: epochs decide)",
                                  elem_id="train-steps")
            lr = gr.Number(first["train.lr"], label=FORM_KEYS["train.lr"], elem_id="train-lr")
        with gr.Row():
            r = gr.Number(first["lora.r"], precision=0, label=FORM_KEYS["lora.r"], elem_id="train-r")
            alpha = gr.Number(first["lora.alpha"], precision=0, label=FORM_KEYS["lora.alpha"], elem_id="train-alpha")
            targets = gr.Textbox(first["lora.target_modules"], label="LoRA targets (auto, or q_proj, v_proj, ...)",
                                 elem_id="train-targets")
            max_length = gr.Number(first["data.max_length"], precision=0, label=FORM_KEYS["data.max_length"],
                                   elem_id="train-max-length")
            packing = gr.Checkbox(first["data.packing"], label=FORM_KEYS["data.packing"], elem_id="train-packing")
            precision = gr.Dropdown(["auto", "bf16", "fp16", "fp32"], value=first["train.precision"],
                                    label=FORM_KEYS["train.precision"], elem_id="train-precision")
        form_error = gr.Markdown(elem_id="train-error")
        with gr.Accordion("The YAML that will run (edit it, or load a file, then Apply)", open=False,
                          elem_id="train-yaml-box"):
            yaml_box = gr.Code(to_yaml(first_raw), language="yaml", interactive=True, lines=12, elem_id="train-yaml")
            with gr.Row():
                apply_btn = gr.Button("Apply YAML to the form", size="sm", elem_id="train-yaml-apply")
                download = gr.DownloadButton("Download YAML", size="sm", elem_id="train-yaml-download")
        with gr.Row():
            estimate_btn = gr.Button("Estimate time and memory (dry run)", elem_id="train-estimate")
            start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
            resume_btn = gr.Button("Resume", interactive=False, elem_id="train-resume")
        estimate_box = gr.Textbox(label="Estimate (measured on two real steps)", lines=6, interactive=False,
                                  visible=False, elem_id="train-estimate-out")
        gr.Markdown("#### Live view")
        job_pick = gr.Dropdown([], label="Job", elem_id="train-job")
        job_status = gr.Markdown("No training job yet.", elem_id="train-status")
        curve = gr.LinePlot(x="step", y="loss", color="curve", height=260, label="Loss", elem_id="train-curve",
                            color_map={"train loss": "#08519c", "eval loss": "#e6550d"})  # loss.png's colours
        log_box = gr.Code(label="Log (end)", language=None, lines=8, max_lines=12, elem_id="train-log")
        timer = gr.Timer(POLL_S)
        last = gr.State(None)
        version = gr.Number(0, visible=False)

    eval_file = run_view(pool, manager, folder, version)

    # -- wiring -----------------------------------------------------------------------------------------------
    fields: list[Any] = [base, adapter, method, train_files, val_files, epochs, max_steps, lr, r, alpha, targets,
                         max_length, packing, precision, name]
    assert len(fields) == len(FORM_KEYS) + 1
    filled = [raw, *fields, yaml_box, download, form_error]
    preview_kw: dict[str, Any] = dict(fn=preview, inputs=[raw, folder, record, *fields],
                                      outputs=[data_report, preview_box, record], concurrency_limit=2,
                                      concurrency_id="train-preview", show_progress="minimal",
                                      api_visibility="private")
    # one at a time, in the order typed: two edits answered out of order would show the older one's YAML and message
    in_order: dict[str, Any] = dict(concurrency_limit=1, concurrency_id="train-form", trigger_mode="always_last",
                                    show_progress="hidden", api_visibility="private")
    config_pick.input(start_from, [config_pick, folder], [folder, *filled], **_FAST).then(**preview_kw)
    for f in fields:
        f.input(edited, [raw, folder, *fields], [yaml_box, download, form_error], **in_order)
    for f in (base, train_files, max_length):
        f.input(**preview_kw)
    record.input(**preview_kw)
    files.upload(upload, [files, folder, train_files],
                 [folder, upload_report, files, train_files, val_files, eval_file], **_FAST).then(
        edited, [raw, folder, *fields], [yaml_box, download, form_error], **in_order).then(**preview_kw)
    apply_btn.click(from_yaml, [yaml_box, folder], [folder, *filled], **_FAST).then(**preview_kw)
    yaml_upload.upload(load_file, [yaml_upload, folder], [folder, *filled], **_FAST).then(**preview_kw)
    estimate_btn.click(estimate, [raw, folder, *fields], estimate_box, concurrency_limit=1,
                       concurrency_id="train-estimate", api_visibility="private")
    stop_btn.click(stop, job_pick, job_status, **_FAST)
    resume_btn.click(resume, job_pick, job_status, **_FAST)
    tick_io: dict[str, Any] = dict(
        inputs=[job_pick, last, version],
        outputs=[job_pick, job_status, curve, log_box, stop_btn, resume_btn, last, version])
    timer.tick(tick, **tick_io, **_FAST)
    start_btn.click(start, [raw, folder, *fields], [job_pick, form_error], **_FAST).then(
        lambda j, v: tick(j, None, v), [job_pick, version], tick_io["outputs"], **_FAST)
    job_pick.input(lambda j, v: tick(j, None, v), [job_pick, version], tick_io["outputs"], **_FAST)
    return version


def _changes(notes: list[str]) -> str:
    return (": " + "; ".join(notes) + ".") if notes else "."


def _curve(p: Any) -> Any:
    """Train and eval loss per step, as the LinePlot's long-format table."""
    import pandas as pd

    rows = [(s, v, "train loss") for s, v in p.losses] + [(s, v, "eval loss") for s, v in p.eval_losses]
    if not rows:  # None, not an empty table: a plot first drawn from an empty table never shows its lines
        return None
    df = pd.DataFrame(rows, columns=["step", "loss", "curve"])
    return df.astype({"step": "int64", "loss": "float64", "curve": "str"})  # numbers, so the axes are numeric
