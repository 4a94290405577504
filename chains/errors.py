"""The exceptions a chain user can cause. Each message names the thing that is wrong and how to fix it.

`tunesmith chain ...` prints them as one line (`error: ...`), like the finetune errors.
"""

from __future__ import annotations

from tunesmith.finetune import ModelLoadError


class ChainError(Exception):
    """Base class: anything wrong with a chain's config, documents, prompt inputs or model output."""


class ChainConfigError(ChainError, ValueError):
    """A chain YAML file is wrong; the message names the file, the key and the fix."""


class ChainModelError(ChainError, ModelLoadError):
    """The chain's model (run folder, merged model, alias) could not be found or loaded.

    Also a `ModelLoadError`, so code that already catches the finetune error keeps working.
    """


class DocumentsError(ChainError):
    """The document folder for retrieval QA is missing, empty or holds nothing readable."""


class PromptVariableError(ChainError, KeyError):
    """A prompt template variable was left unfilled."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class OutputParseError(ChainError):
    """The model's reply could not be turned into the wanted output (a label, a JSON object)."""
