"""Which models the UI and the API may answer with, and one loaded `Generator` per model, shared by all users.

A model name comes from a browser or an HTTP request, so it is never turned into a path directly: it must be a
name the pool listed (a run folder directly inside the runs folder, or a source given on the command line).
`<name>:base` answers with the same loaded weights with the adapter switched off, for tuned-vs-base comparisons.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from tunesmith import PREFIX_CACHE_MIB
from tunesmith.finetune import GenerationParams, Generator, ModelLoadError, is_run_dir, load_generator, resolve_source

BASE_SUFFIX = ":base"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownModelError(ModelLoadError):
    """A requested model name is not one the pool offers (unknown, malformed, or outside the runs folder)."""


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model name: which Generator to use and whether to switch its adapter off."""

    name: str
    """What the user picked, e.g. `quickstart` or `quickstart:base`."""
    source: str
    """What `load_generator` gets: a run folder path, or a model source given on the command line."""
    use_adapter: bool

    def params(self, params: GenerationParams) -> GenerationParams:
        """`params` with the adapter switched on or off as this choice asks."""
        return replace(params, use_adapter=self.use_adapter)


class ModelPool:
    """Lists runs in `runs_dir` on every call (new runs show up without a restart) and caches loaded Generators.

    At most `max_loaded` models stay in memory (least recently used is dropped; requests still using it keep
    their reference until they finish). Loading happens once per source even when many users ask at once.
    """

    def __init__(self, runs_dir: str | Path = "runs", default: str = "embedded", max_loaded: int = 2,
                 engine: str = "transformers", decode_weights: str = "exact", compile_decode: bool = False,
                 prefix_cache_mib: int = PREFIX_CACHE_MIB, batch_slots: int = 16,
                 prefill_chunk: int | None = None) -> None:
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.engine = engine
        """`transformers` or `llama.cpp` (finetune's load_generator): every model of this pool is served by it."""
        self.decode_weights = decode_weights
        """transformers engine: "exact", "int8" or "auto" (int8 on a CPU), see finetune's `Generator`."""
        self.compile_decode = compile_decode
        """transformers engine: single streams decode through a compiled step (compiled when a model loads)."""
        self.prefix_cache_mib = prefix_cache_mib
        """transformers engine: each model's prefix cache budget (finetune/prefixes.py), 0 for none."""
        self.batch_slots = batch_slots
        """transformers engine: answers each model decodes at once (rows of its continuous batch)."""
        self.prefill_chunk = prefill_chunk
        """transformers engine: prompt tokens a prefill forward computes at most while answers decode (None: the
        device's default, finetune/continuous.py)."""
        self.max_loaded = max(1, max_loaded)
        self.extra: dict[str, str] = {}
        """name -> source for models named on the command line (trusted: the operator typed them)."""
        self.default = self.add_source(default)
        self._loaded: OrderedDict[str, Generator] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def add_source(self, source: str) -> str:
        """Register a command-line model (a run folder, `embedded`, a model folder, .gguf or hub id); return its
        display name. finetune's `resolve_source` decides what it is, so a mistyped path fails at start-up."""
        src = resolve_source(source)
        if Path(src.location).parent == self.runs_dir and _SAFE_NAME.match(src.name) and is_run_dir(src.location):
            return src.name  # a run inside the runs folder: listed by name anyway
        name = src.name
        if not _SAFE_NAME.match(name):
            name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:128] or "model"
        self.extra[name] = src.location
        return name

    # -- listing ---------------------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Finished runs directly inside the runs folder (a run still training has no adapter yet and is left out)."""
        if not self.runs_dir.is_dir():
            return []
        found = []
        for d in sorted(self.runs_dir.iterdir()):
            # is_symlink: a link could point anywhere on disk; only real folders under runs_dir are offered
            if _SAFE_NAME.match(d.name) and d.is_dir() and not d.is_symlink() and is_run_dir(d):
                found.append(d.name)
        return found

    def names(self) -> list[str]:
        """Every model name a user may pick: the default first, each run, and each run's base model alone."""
        out = [self.default]
        for n in [*self.extra, *self.runs()]:
            if n not in out:
                out.append(n)
        with_base = []
        for n in out:
            with_base.append(n)
            if self._has_adapter(n):
                with_base.append(n + BASE_SUFFIX)
        return with_base

    def _has_adapter(self, name: str) -> bool:
        src = self.extra.get(name)
        return is_run_dir(src) if src else is_run_dir(self.runs_dir / name)

    # -- resolving and loading -------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ModelChoice:
        """Name -> ModelChoice, refusing anything not listed (so `../../etc` or `/abs/path` never reach the disk)."""
        name = (name or self.default).strip()
        base = name.endswith(BASE_SUFFIX)
        plain = name[: -len(BASE_SUFFIX)] if base else name
        if plain in self.extra:
            source = self.extra[plain]
        elif _SAFE_NAME.match(plain) and plain in self.runs():
            source = str(self.runs_dir / plain)
        else:
            source = None
        if source is None or (base and not self._has_adapter(plain)):
            raise UnknownModelError(
                f"Unknown model {name!r}. Pick one of {', '.join(self.names())} (runs are the finished run folders "
                f"directly inside {self.runs_dir}; start with --runs-dir to use another folder)."
            )
        return ModelChoice(name, source, use_adapter=not base)

    def get(self, name: str | None) -> tuple[Generator, ModelChoice]:
        """The loaded Generator for `name` (loading it on first use) and the resolved choice."""
        choice = self.resolve(name)
        with self._lock:
            gen = self._loaded.get(choice.source)
            if gen is not None:
                self._loaded.move_to_end(choice.source)
                return gen, choice
            load_lock = self._loading.setdefault(choice.source, threading.Lock())
        with load_lock:  # one load per source; others asking for it meanwhile wait for that load
            with self._lock:
                gen = self._loaded.get(choice.source)
            if gen is None:
                gen = self._load(choice)
                with self._lock:
                    self._loaded[choice.source] = gen
                    while len(self._loaded) > self.max_loaded:
                        self._loaded.popitem(last=False)
        return gen, choice

    def _load(self, choice: ModelChoice) -> Generator:
        """load_generator, with what goes wrong while loading said in words the user can act on."""
        try:
            kw = ({"decode_weights": self.decode_weights, "compile_decode": self.compile_decode,
                   "prefix_cache_mib": self.prefix_cache_mib, "batch_slots": self.batch_slots,
                   "prefill_chunk": self.prefill_chunk}
                  if self.engine == "transformers" else {"engine": self.engine})
            return load_generator(choice.source, **kw)
        except (ModelLoadError, OSError, ValueError) as e:  # HFValidationError: a folder gone mid-load reads as a hub id
            if self._vanished_run(choice):
                raise UnknownModelError(
                    f"The run {choice.name} was removed from {self.runs_dir} while it was loading. Pick another "
                    "model (in the web app, press Refresh runs to update the list)."
                ) from e
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(
                f"Could not load {choice.name} from {choice.source} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}). Check that the folder is complete (a run needs "
                "config.yaml and adapter/), or pick another model."
            ) from e

    def _vanished_run(self, choice: ModelChoice) -> bool:
        src = Path(choice.source)
        return src.parent == self.runs_dir and not is_run_dir(src)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
