"""Fine-tuning core: config, data, LoRA training, evaluation, merging, and the one generation API.

    from tunesmith.finetune import load_config, train, load_generator
    summary = train(load_config("configs/quickstart.yaml", ["train.max_steps=10"]))
    gen = load_generator("runs/quickstart")
    print(gen.generate([{"role": "user", "content": "Which module defines `dumps`?"}]).text)
"""

from .config import Config, ConfigError, load_config, save_config
from .data import DataError
from .evaluate import evaluate_run
from .generate import Chunk, Completion, GenerationParams, Generator, load_generator
from .merge import MergeError, merge_run
from .model import LoadedRun, ModelLoadError, load_run
from .train import train

__all__ = [
    "Chunk", "Completion", "Config", "ConfigError", "DataError", "GenerationParams", "Generator", "LoadedRun",
    "MergeError", "ModelLoadError", "evaluate_run", "load_config", "load_generator", "load_run", "merge_run",
    "save_config", "train",
]
