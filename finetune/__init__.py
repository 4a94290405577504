"""Fine-tuning core: config, data, LoRA training, evaluation, merging, and the one generation API.

    from tunesmith.finetune import load_config, train, load_generator
    summary = train(load_config("configs/quickstart.yaml", ["train.max_steps=10"]))
    gen = load_generator("runs/quickstart")
    print(gen.generate([{"role": "user", "content": "Which module defines `dumps`?"}]).text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith import lazy_exports

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config, save_config
    from .data import DataError, Record, read_records
    from .errors import MergeError, ModelLoadError
    from .evaluate import evaluate_run
    from .generate import Chunk, Completion, GenerationParams, Generator, load_generator
    from .merge import merge_run
    from .model import LoadedRun, load_run
    from .sweep import sweep
    from .trainer import train

# public names load on first use (see tunesmith.lazy_exports): the CLI must start without importing torch
_WHERE = {
    "Config": ".config", "ConfigError": ".config", "load_config": ".config", "save_config": ".config",
    "DataError": ".data", "Record": ".data", "read_records": ".data", "evaluate_run": ".evaluate", "Chunk": ".generate", "Completion": ".generate",
    "GenerationParams": ".generate", "Generator": ".generate", "load_generator": ".generate", "MergeError": ".errors",
    "merge_run": ".merge", "LoadedRun": ".model", "ModelLoadError": ".errors", "load_run": ".model", "sweep": ".sweep",
    "train": ".trainer",
}

__all__ = [
    "Chunk", "Completion", "Config", "ConfigError", "DataError", "GenerationParams", "Generator", "LoadedRun",
    "MergeError", "ModelLoadError", "Record", "evaluate_run", "load_config", "load_generator", "load_run",
    "merge_run", "read_records", "save_config", "sweep", "train",
]


__getattr__ = lazy_exports(__name__, _WHERE)
