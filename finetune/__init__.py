"""Fine-tuning core: config, data, LoRA training, evaluation, merging, and the one generation API.

    from tunesmith.finetune import load_config, train, load_generator
    summary = train(load_config("configs/quickstart.yaml", ["train.max_steps=10"]))
    gen = load_generator("runs/quickstart")
    print(gen.generate([{"role": "user", "content": "Which module defines `dumps`?"}]).text)

This package is the only door `chains/`, `ui/` and the CLI use (a test checks they never import its modules):

- configs: `load_config`, `save_config`, `Config`, `ConfigError`; `build_section` / `check_values`, the one
  validator for typed YAML sections (chain configs use it too), `read_yaml`, `parse_override` (`key=value`).
- data: `read_records`, `load_records`, `build_examples`, `format_preview`, `resolve_chat_template`, `Record`,
  `DataReport`, `DataError`, `detect_format` (a record's format from its keys, as `data.format: auto` does),
  `preview_examples` (what `tunesmith data preview` shows, per record: preference pairs as chosen then rejected).
- models: `resolve_source` -> `Source` (what a run folder, model folder, .gguf, `embedded` or hub id is, checked
  once), `load_run`, `LoadedRun`, `load_tokenizer`, `resolve_base_model`, `is_run_dir` (a finished run),
  `EMBEDDED_ALIASES`, `cache_dir` (where tunesmith caches), `ModelLoadError`.
- generation: `load_generator`, `Generator`, `GenerationParams`, `Completion`, `Chunk`, `Prompt`, token
  log-probabilities (`TokenLogprobs`, `GeneratedLogprob`, `token_key`), `cut_at_stop`, the context window
  (`context_length`, `fit_context`, `ContextError`), and `UnsupportedRequest` (what an engine cannot serve).
- runs: `read_metrics` (a run's metrics.jsonl, also while the trainer is still appending to it).
- threads: `on_own_thread` (run torch work on a thread that ends with it, so no long-lived thread keeps an
  OpenMP team that slows every other thread's generation; the embeddings of `chains` use it too).
- streams: `aiter_chunks` (a blocking stream, awaited on the event loop) and `merge_streams` (several streams
  read as their chunks come): the one thread-to-queue pump of the UI, the API and LangChain's `astream`.
- jobs: `train`, `sweep`, `evaluate_run` (+ `format_table`, `save_result`), `merge_run` (`MergeError`), `dry_run`,
  `export_gguf` (a verified GGUF + Ollama Modelfile + model card; `QUANTS`, `ExportResult`, `ExportError`),
  `push_run` (adapter / merged / GGUF to the Hugging Face Hub);
  `USER_ERRORS`, the exceptions the CLI prints as one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith import lazy_exports

if TYPE_CHECKING:
    from .config import (
        Config,
        ConfigError,
        build_section,
        check_values,
        load_config,
        parse_override,
        read_yaml,
        save_config,
    )
    from .data import (
        DataError,
        DataReport,
        Record,
        build_examples,
        detect_format,
        format_preview,
        load_records,
        read_records,
        resolve_chat_template,
    )
    from .errors import USER_ERRORS, ExportError, MergeError, ModelLoadError, UnsupportedRequest
    from .estimate import dry_run
    from .evaluate import evaluate_run, format_table, save_result
    from .export import QUANTS, ExportResult, export_gguf
    from .generate import Generator, context_length, cut_at_stop, fit_context, load_generator
    from .logits import GeneratedLogprob, token_key
    from .merge import merge_run
    from .methods import preview_examples
    from .model import (
        EMBEDDED_ALIASES,
        LoadedRun,
        Source,
        cache_dir,
        is_run_dir,
        load_run,
        load_tokenizer,
        resolve_base_model,
        resolve_source,
    )
    from .params import Chunk, Completion, ContextError, GenerationParams, Prompt, TokenLogprobs
    from .push import push_run
    from .runs import read_metrics
    from .sharing import on_own_thread
    from .streams import aiter_chunks, merge_streams
    from .sweep import sweep
    from .trainer import train

# public names load on first use (see tunesmith.lazy_exports): the CLI must start without importing torch
_WHERE = {
    **dict.fromkeys(["Config", "ConfigError", "build_section", "check_values", "load_config", "parse_override",
                     "read_yaml", "save_config"], ".config"),
    **dict.fromkeys(["DataError", "DataReport", "Record", "build_examples", "detect_format", "format_preview",
                     "load_records", "read_records", "resolve_chat_template"], ".data"),
    **dict.fromkeys(["USER_ERRORS", "ExportError", "MergeError", "ModelLoadError", "UnsupportedRequest"], ".errors"),
    **dict.fromkeys(["QUANTS", "ExportResult", "export_gguf"], ".export"),
    "push_run": ".push",
    "dry_run": ".estimate",
    **dict.fromkeys(["evaluate_run", "format_table", "save_result"], ".evaluate"),
    **dict.fromkeys(["Chunk", "Completion", "ContextError", "GenerationParams", "Prompt", "TokenLogprobs"], ".params"),
    **dict.fromkeys(["Generator", "context_length", "cut_at_stop", "fit_context", "load_generator"], ".generate"),
    **dict.fromkeys(["GeneratedLogprob", "token_key"], ".logits"),
    "merge_run": ".merge",
    "preview_examples": ".methods",
    **dict.fromkeys(["EMBEDDED_ALIASES", "LoadedRun", "Source", "cache_dir", "is_run_dir", "load_run", "load_tokenizer",
                     "resolve_base_model", "resolve_source"], ".model"),
    "on_own_thread": ".sharing",
    **dict.fromkeys(["aiter_chunks", "merge_streams"], ".streams"),
    "read_metrics": ".runs",
    "sweep": ".sweep",
    "train": ".trainer",
}

__all__ = [
    "Chunk", "Completion", "Config", "ConfigError", "ContextError", "DataError", "DataReport", "EMBEDDED_ALIASES",
    "ExportError", "ExportResult", "QUANTS", "export_gguf", "push_run",
    "GeneratedLogprob", "GenerationParams", "Generator", "LoadedRun", "MergeError", "ModelLoadError", "Prompt",
    "Record", "Source", "TokenLogprobs", "USER_ERRORS", "UnsupportedRequest", "aiter_chunks", "build_examples", "build_section",
    "cache_dir", "check_values", "context_length", "cut_at_stop", "detect_format", "dry_run", "evaluate_run", "fit_context",
    "format_preview", "format_table", "is_run_dir", "load_config", "load_generator", "load_records", "load_run",
    "load_tokenizer", "merge_run", "merge_streams", "on_own_thread", "parse_override", "preview_examples", "read_metrics", "read_records", "read_yaml",
    "resolve_base_model", "resolve_chat_template", "resolve_source", "save_config", "save_result", "sweep",
    "token_key", "train",
]


__getattr__ = lazy_exports(__name__, _WHERE)
