"""The Train tab's form and its YAML, kept in sync; data uploads and the data report. No layout here (train_tab.py).

The YAML is the truth: the form edits a few of its keys (`FORM_KEYS`) and leaves every other key as the starting
config or the loaded file set it, so `form -> YAML -> form` changes nothing. Values are checked by the CLI's own
validator (`load_config`), so a bad value gets the exact message `tunesmith train` would print.

What a browser may point the server at is limited: base models are the ones listed (`embedded`, model folders
given on the command line, merged or fully fine-tuned runs), data files are the shipped examples or this session's
uploads, and a run goes to the runs folder under a plain name. A loaded YAML naming anything else is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import re
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunesmith.finetune import (
    Config,
    ConfigError,
    DataReport,
    detect_format,
    format_preview,
    load_config,
    load_records,
    load_tokenizer,
    preview_examples,
    read_records,
    read_yaml,
    resolve_source,
)
from tunesmith.resources import config_names, find_config, shipped_root

from .documents import store_uploads
from .pool import ModelPool

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""What `tunesmith train` reads (a datasets folder cannot be uploaded)."""
MAX_DATA_BYTES = 50 * 1024 * 1024
MAX_DATA_FILES = 10
PREVIEW_LIMIT = 5000
"""Records tokenized for the report; bigger files are counted on their first PREVIEW_LIMIT records (and said so)."""
SESSION_PREFIX = "tunesmith-train-"

ADAPTERS = {
    "LoRA": {"finetuning_type": "lora", "lora.use_dora": False, "lora.load_in_4bit": False},
    "DoRA": {"finetuning_type": "lora", "lora.use_dora": True, "lora.load_in_4bit": False},
    "QLoRA (4-bit base, CUDA)": {"finetuning_type": "lora", "lora.use_dora": False, "lora.load_in_4bit": True},
    "Full fine-tuning": {"finetuning_type": "full", "lora.use_dora": False, "lora.load_in_4bit": False},
}
"""The `Weights trained` choice and the config keys each one sets."""

FORM_KEYS: dict[str, str] = {
    "base_model": "Base model",
    "adapter": "Weights trained",
    "method": "Method",
    "data.train": "Training data",
    "data.validation": "Validation data",
    "train.epochs": "Epochs",
    "train.max_steps": "Max steps",
    "train.lr": "Learning rate",
    "lora.r": "LoRA rank r",
    "lora.alpha": "LoRA alpha",
    "lora.target_modules": "LoRA target modules",
    "data.max_length": "Max length (tokens)",
    "data.packing": "Packing",
    "train.precision": "Precision",
}
"""Form field -> its label, in the order the tab lays them out (and passes them to events). `adapter` stands for
finetuning_type + lora.use_dora + lora.load_in_4bit."""
INT_KEYS = {"train.max_steps", "lora.r", "lora.alpha", "data.max_length"}


def methods() -> list[str]:
    """The training methods this version's config knows (`method:`), or just `sft` before it had the key."""
    hint = typing.get_type_hints(Config).get("method")
    return list(typing.get_args(hint)) or ["sft"] if hint is not None else ["sft"]


# -- config <-> form <-> YAML ------------------------------------------------------------------------------------
def defaults() -> dict[str, Any]:
    return dataclasses.asdict(Config())


def get_key(raw: dict[str, Any], dotted: str) -> Any:
    """The value `raw` sets for `section.key`, else the config's default."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            node = defaults()
            for p in dotted.split("."):
                node = node.get(p) if isinstance(node, dict) else None
            return node
        node = node[part]
    return node


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    node = raw
    for s in sections:
        if not isinstance(node.get(s), dict):
            node[s] = {}
        node = node[s]
    node[last] = value


def form_values(raw: dict[str, Any], runs_dir: Path) -> dict[str, Any]:
    """The form's fields as `raw` sets them (defaults elsewhere), plus `name`, the run's folder name."""
    out = {k: get_key(raw, k) for k in FORM_KEYS if k != "adapter"}
    keys = {k: get_key(raw, k) for k in ("finetuning_type", "lora.use_dora", "lora.load_in_4bit")}
    out["adapter"] = next((a for a, v in ADAPTERS.items() if v == keys), "LoRA")
    out["method"] = out["method"] or "sft"
    targets = out["lora.target_modules"]
    out["lora.target_modules"] = ", ".join(targets) if isinstance(targets, list) else str(targets)
    out["data.train"] = list(out["data.train"] or [])
    out["data.validation"] = list(out["data.validation"] or [])
    out["name"] = Path(str(get_key(raw, "output_dir"))).name
    return out


def apply_form(raw: dict[str, Any], values: dict[str, Any], runs_dir: Path) -> dict[str, Any]:
    """`raw` with the form's fields written into it (a copy); other keys stay as they were."""
    raw = copy.deepcopy(raw)

    def put(key: str, value: Any) -> None:  # a value the config already has is not written: no default piles up
        if _has(raw, key) or get_key(raw, key) != value:
            set_key(raw, key, value)

    for key, value in values.items():
        if key == "adapter":
            for k, v in ADAPTERS.get(value, ADAPTERS["LoRA"]).items():
                put(k, v)
        elif key == "name":
            set_key(raw, "output_dir", str(Path(runs_dir) / str(value).strip()))
        elif key == "method":
            if len(methods()) > 1:  # a config without the `method` key (an older schema) never gets one
                put(key, value or "sft")
        elif key == "lora.target_modules":
            parts = [p.strip() for p in str(value or "").replace("\n", ",").split(",") if p.strip()]
            put(key, "auto" if parts in ([], ["auto"]) else parts)
        elif key in INT_KEYS and isinstance(value, float) and value.is_integer():
            put(key, int(value))  # gradio numbers come as floats; the validator wants an integer
        elif key in ("data.train", "data.validation"):
            put(key, list(value or []))
        else:
            put(key, value)
    return raw


def _has(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def to_yaml(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str, folder: Path, name: str = "loaded.yaml") -> dict[str, Any]:
    """A YAML text (pasted or uploaded) as a mapping; a syntax error names the line (ConfigError)."""
    path = Path(folder) / name
    path.write_text(text)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{Path(folder)}/", "")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of config keys (base_model: ..., data: ...)")
    return raw


def check(raw: dict[str, Any], folder: Path, name: str = "train.yaml") -> tuple[Config | None, str]:
    """Validate as `tunesmith train` does: (config, "") or (None, the CLI's message, naming `name`)."""
    path = Path(folder) / name
    path.write_text(to_yaml(raw))
    try:
        return load_config(path), ""
    except ConfigError as e:
        return None, str(e).replace(f"{Path(folder)}/", "")


def error_field(message: str) -> str | None:
    """The form field an error message is about (its first `key`), if the form has one."""
    for key in re.findall(r"`([a-z_][a-z0-9_.]*)`", message):
        if key in FORM_KEYS:
            return key
        if key in ("finetuning_type", "lora.use_dora", "lora.load_in_4bit"):
            return "adapter"
        if key == "output_dir":
            return "name"
    return None


def error_markdown(message: str) -> str:
    """The message as shown under the form: which field, then the validator's own words."""
    if not message:
        return ""
    key = error_field(message)
    label = {"name": "Run name", **FORM_KEYS}.get(key or "", "")
    return f"⚠️ **{label}**: {message}" if label else f"⚠️ {message}"


# -- what a browser may point at ----------------------------------------------------------------------------------
def base_choices(pool: ModelPool) -> list[tuple[str, str]]:
    """(label, base_model value): embedded, model folders given on the command line, and runs one can continue
    from (a merged run, or a full fine-tune's model folder)."""
    out = [("embedded (SmolLM2-135M-Instruct)", "embedded")]
    for name, location in pool.extra.items():
        try:
            kind = resolve_source(location).kind
        except Exception:  # a folder gone since start-up: not offered
            continue
        if kind == "model_dir":
            out.append((f"{name} (model folder)", location))
    for run in pool.runs():
        for sub, what in (("merged", "merged"), ("model", "full fine-tune")):
            folder = pool.runs_dir / run / sub
            if (folder / "config.json").exists():
                out.append((f"{run} ({what}: continue from it)", str(folder)))
    return out


def data_choices(folder: str | Path | None) -> list[tuple[str, str]]:
    """(label, path as the config says it): the shipped example data, then this session's uploads."""
    out = [(f"example: {sub}/{p.name}", f"examples/{sub}/{p.name}") for sub in ("data", "chains")
           for p in sorted((shipped_root() / "examples" / sub).glob("*.jsonl"))]
    return out + [(f"uploaded: {name}", str(Path(folder) / name)) for name in uploads(folder) if folder]


def uploads(folder: str | Path | None) -> list[str]:
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def check_sources(raw: dict[str, Any], pool: ModelPool, folder: str | Path | None) -> str:
    """"" when the config names only what this server offers; else what to pick instead."""
    bases = [v for _, v in base_choices(pool)]
    base = str(get_key(raw, "base_model"))
    if base not in bases:
        return (f"base_model `{base}` is not one this server offers: pick one of the Base model list (start "
                "`tunesmith ui` with a model folder to add one).")
    data = [v for _, v in data_choices(folder)]
    for key in ("data.train", "data.validation"):
        files = get_key(raw, key)
        for f in [files] if isinstance(files, str) else files or []:
            if f not in data:
                return f"`{key}` names {f}, which is not an uploaded or example file: upload it, then pick it."
    if get_key(raw, "trust_remote_code"):
        return ("`trust_remote_code`: a config from the browser cannot run a model's own Python code; train it "
                "with `tunesmith train` on the server instead.")
    template = get_key(raw, "data.chat_template")
    if isinstance(template, str) and template.endswith((".jinja", ".j2")):
        return ("`data.chat_template`: a template file on the server cannot be named from the browser; paste the "
                "template itself, or use `chatml`.")
    rewards = get_key(raw, "grpo.rewards") if _has(raw, "grpo") else []
    for spec in rewards if isinstance(rewards, list) else []:
        named = spec.get("name") if isinstance(spec, dict) else spec
        if isinstance(named, str) and ":" in named:
            return (f"`grpo.rewards`: `{named}` is Python code on the server; from the browser only the built-in "
                    "rewards can be used (exact_match, regex, json, length).")
    name = Path(str(get_key(raw, "output_dir"))).name
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
        return (f"`output_dir`: the run name {name!r} must start with a letter or digit and use only letters, "
                "digits, `.`, `_` and `-` (it becomes a folder in the runs folder).")
    return ""


def offered(raw: dict[str, Any], pool: ModelPool, folder: str | Path | None) -> tuple[dict[str, Any], list[str]]:
    """A loaded config cut down to what this server offers (the form's lists hold nothing else): a base model it
    does not offer becomes `embedded`, data files that are not examples or uploads are dropped; and what was
    changed, in words."""
    raw, notes = copy.deepcopy(raw), []
    bases = [v for _, v in base_choices(pool)]
    if str(get_key(raw, "base_model")) not in bases:
        notes.append(f"base_model `{get_key(raw, 'base_model')}` is not offered here: `embedded` instead")
        raw["base_model"] = "embedded"
    data = [v for _, v in data_choices(folder)]
    for key in ("data.train", "data.validation"):
        files = get_key(raw, key) or []
        files = [files] if isinstance(files, str) else files
        missing = [f for f in files if f not in data]
        if missing:
            notes.append(f"`{key}`: {', '.join(missing)} is not an example or uploaded file here: upload it")
            set_key(raw, key, [f for f in files if f in data])
    return raw, notes


def shipped_configs() -> list[str]:
    """Shipped training configs (a chain config has no `base_model`)."""
    names = []
    for name in config_names():
        path = find_config(name)
        if path is not None and "base_model" in path.read_text():
            names.append(name)
    return names


def load_shipped(name: str) -> dict[str, Any]:
    path = find_config(name)
    if path is None:
        raise ConfigError(f"config {name} not found; pick one of {', '.join(shipped_configs())}")
    raw = read_yaml(path)
    return raw if isinstance(raw, dict) else {}


# -- uploads ------------------------------------------------------------------------------------------------------
def new_session_folder() -> str:
    return tempfile.mkdtemp(prefix=SESSION_PREFIX)


def remove_session_folder(folder: str | None) -> None:
    """Gradio calls it when a session ends; a started run keeps copies of its files in its own folder."""
    if folder and Path(folder).name.startswith(SESSION_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def store_data(paths: list[str], folder: str | Path, max_bytes: int = MAX_DATA_BYTES) -> list[str]:
    """Copy acceptable data files into the session folder; one line per file: stored, or why not. Files are only
    ever read as records (JSON lines, CSV rows, Parquet tables), never run."""
    return store_uploads(paths, folder, max_bytes, DATA_SUFFIXES, MAX_DATA_FILES, "training data is {}", "uploaded",
                         binary=(".parquet",))


def copy_uploads(raw: dict[str, Any], folder: str | Path | None, out: Path) -> dict[str, Any]:
    """At Start: session uploads named by the config are copied into RUN/data (the session folder goes when the
    browser tab closes; a queued or resumed run still needs them), and the config points at the copies."""
    raw = copy.deepcopy(raw)
    if not folder:
        return raw
    for key in ("data.train", "data.validation"):
        files = get_key(raw, key)
        if not files:
            continue
        moved = []
        for f in [files] if isinstance(files, str) else files:
            if Path(f).parent == Path(folder):
                (out / "data").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out / "data" / Path(f).name)
                f = str(out / "data" / Path(f).name)
            moved.append(f)
        set_key(raw, key, moved)
    return raw


# -- the data report and the masked-token preview ----------------------------------------------------------------
@dataclass
class DataView:
    """The training files as the trainer will see them, for the report and the preview."""

    report: str
    examples: list[list[tuple[str, Any]]] = field(default_factory=list)
    """Per record, its tokenized parts with a title: one SFT example (""), a pair's chosen and rejected sides, a
    KTO answer with its label, a GRPO prompt."""
    tokenizer: Any = None


def inspect_data(cfg: Config) -> DataView:
    """Formats, record and token counts, and the tokenized records (what `tunesmith data preview` shows, by
    `preview_examples`: preference pairs as chosen and rejected, KTO answers, GRPO prompts)."""
    if not cfg.data.train:
        return DataView("Pick or upload a training file to see its format, counts and a preview.")
    method = getattr(cfg, "method", "sft")
    lines = []
    for f in cfg.data.train:
        if method != "sft":
            lines.append(f"- `{Path(f).name}`: records for method **{method}**")
            continue
        first = next(iter(read_records(f)), None)
        fmt = cfg.data.format if cfg.data.format != "auto" else (detect_format(first) if first else "empty")
        lines.append(f"- `{Path(f).name}`: format **{fmt}**")
    records = load_records(cfg.data.train)
    tok = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if cfg.data.chat_template:
        from tunesmith.finetune import resolve_chat_template

        tok.chat_template = resolve_chat_template(tok, cfg.data.chat_template)
    report = DataReport()
    examples = preview_examples(records[:PREVIEW_LIMIT], tok, cfg, report)
    counted = f" (first {PREVIEW_LIMIT} of {len(records)} records counted)" if len(records) > PREVIEW_LIMIT else ""
    lines += [f"- {line}" for line in report.lines()]
    return DataView("\n".join(lines) + counted, examples, tok)


_ANSI = re.compile(r"\x1b\[([0-9;]*)m(.*?)\x1b\[0m", re.S)
_STYLE = {"trained": "background:#c6f6d5;color:#1c4532;border-radius:2px",
          "context": "color:#718096"}


def _span(kind: str, text: str) -> str:
    return f'<span class="{kind}" style="{_STYLE[kind]}">{html.escape(text)}</span>'


def preview_html(view: DataView, index: int) -> str:
    """Record `index` with the trained-on tokens highlighted (format_preview's colours turned into HTML), each part
    of a preference pair under its title."""
    if not view.examples:
        return ""
    parts = view.examples[max(0, min(int(index), len(view.examples) - 1))]
    out = []
    for title, ex in parts:
        text = format_preview(ex, view.tokenizer, color=True)
        body, _, footer = text.rpartition("\n-- ")
        spans = "".join(_span("trained" if code == "1;32" else "context", piece)
                        for code, piece in _ANSI.findall(body))
        head = f'<div class="ts-part"><b>{html.escape(title)}</b></div>' if title else ""
        out.append(f'{head}<pre class="ts-preview" style="white-space:pre-wrap">{spans}</pre>'
                   f'<div class="ts-legend">{html.escape(footer)}</div>')
    legend = f'{_span("trained", "trained on (loss)")} · {_span("context", "context only")}'
    return "".join(out) + f'<div class="ts-legend">{legend}</div>'
