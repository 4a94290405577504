"""The exceptions a user can cause. The CLI prints these as one line (`error: ...`) instead of a traceback."""

from __future__ import annotations

from .config import ConfigError
from .data import DataError
from .merge import MergeError
from .model import ModelLoadError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelLoadError, MergeError, FileExistsError, FileNotFoundError,
)
