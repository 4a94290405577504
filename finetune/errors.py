"""The exceptions a user can cause. The CLI prints these as one line (`error: ...`) instead of a traceback.

Kept free of torch imports, so the CLI and `tunesmith.chains.errors` can name them without loading a model stack.
"""

from __future__ import annotations

from .config import ConfigError
from .data import DataError


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do about it."""


class MergeError(RuntimeError):
    """An adapter could not be merged, or the merged model does not reproduce base + adapter."""


class ExportError(RuntimeError):
    """A run cannot be exported (unsupported architecture, unfinished run, unwritable path), or the written file does
    not reproduce the model; the message names the file and what differs."""


class UnsupportedRequest(ValueError):
    """A request the loaded engine cannot serve (scoring, echo logprobs or base-model answers on llama.cpp): the
    caller's choice to change, so front ends answer it as a bad request (400), not as a server failure."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss is not finite, fp16 overflows); the message says which setting fixes it."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelLoadError, MergeError, ExportError, TrainingError, FileExistsError, FileNotFoundError,
)
