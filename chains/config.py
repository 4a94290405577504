"""Chains written as YAML (configs/chains/*.yaml): one typed schema, checked by finetune's config validator.

A file names a `kind` (which pipeline), the `model` (a run folder, merged model or `embedded`), generation
`params` (the fields of finetune's GenerationParams, not a second copy of them), and the kind's own settings. Keys that do not exist, or that belong to another kind, are rejected with
the file and the key named. Relative paths (model, docs_dir) are relative to the folder you run from, as in the
training configs; a docs_dir not found there is looked up among the shipped files (examples/docs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.runnables import Runnable
from pydantic import BaseModel, create_model

from tunesmith.finetune import ConfigError, GenerationParams, build_section, check_values, read_yaml
from tunesmith.resources import config_names, find_config, resolve_path, shipped_root

from .errors import ChainConfigError, ChainModelError

Kind = Literal["rag", "classify", "extract", "summarize", "few_shot", "prompt"]
CONFIG_DIRS = (Path("configs/chains"), shipped_root() / "configs" / "chains")
"""Where `tunesmith chain run NAME` looks for NAME.yaml: under the current folder, then among the shipped ones."""


@dataclass
class ChainConfig:
    kind: Kind
    """Which pipeline: rag, classify, extract, summarize, few_shot or prompt."""
    description: str = ""
    """One line shown by `tunesmith chain list`."""
    model: str = "embedded"
    """A run folder (runs/NAME), a merged model folder, or `embedded` (works offline)."""
    adapter: str | None = None
    """A checkpoint inside the run (checkpoints/step-N); default: the final adapter."""
    params: dict[str, Any] = field(default_factory=dict)
    """Generation settings: any field of `tunesmith.finetune.GenerationParams` (max_new_tokens,
    temperature, top_p, top_k, repetition_penalty, stop, seed, use_adapter). Unset ones keep TunedChatModel's
    defaults, which are greedy (temperature 0) so a chain gives the same answer every time."""
    prompt: str | None = None
    """prompt: the user message template ({input} and any {variables}); rag: the system prompt, with {context}, for
    generated answers (extractive: false)."""
    system: str = ""
    """prompt: an optional system message (may use {variables} too)."""
    instructions: str = ""
    """classify / extract / few_shot: extra guidance added to the system message."""
    input_key: str = "input"
    """prompt / few_shot: the variable that `--input` fills."""
    labels: list[str] = field(default_factory=list)
    """classify: the allowed labels."""
    fallback: str | None = None
    """classify: the label to give when the reply names none (default: an error)."""
    examples: list[dict[str, str]] = field(default_factory=list)
    """few_shot: [{input: ..., output: ...}]; classify: [{text: ..., label: ...}]."""
    fields: dict[str, str] = field(default_factory=dict)
    """extract: field name -> type: str, int, float, bool, list[str], list[int]; a trailing `?` makes it optional."""
    max_retries: int = 2
    """extract: retries with the parse error fed back."""
    docs_dir: str | None = None
    """rag: the folder of .txt/.md documents."""
    index_dir: str | None = None
    """rag: where the FAISS index is saved (default: under ~/.cache/tunesmith/rag)."""
    k: int = 2
    """rag: passages retrieved per question."""
    extractive: bool = True
    """rag: answer with the passage sentence the model ranks best, and its file (a model loaded by tunesmith);
    false: generate the answer with `prompt`."""
    chunk_size: int | None = None
    """rag: characters per indexed chunk (default 600); summarize: characters per mapped part (default 2000)."""
    chunk_overlap: int | None = None
    max_words: int | None = None
    """summarize: the final summary's length limit, given to the model."""


_COMMON = {"kind", "description", "model", "adapter", "params"}
_KEYS = {
    "rag": {"docs_dir", "index_dir", "k", "chunk_size", "chunk_overlap", "prompt", "extractive"},
    "classify": {"labels", "fallback", "examples", "instructions"},
    "extract": {"fields", "instructions", "max_retries"},
    "summarize": {"chunk_size", "chunk_overlap", "max_words"},
    "few_shot": {"examples", "instructions", "input_key"},
    "prompt": {"prompt", "system", "input_key"},
}
"""Which keys each kind reads; setting another kind's key is an error, not silently ignored."""
_REQUIRED = {"rag": ["docs_dir"], "classify": ["labels"], "extract": ["fields"], "few_shot": ["examples"],
             "prompt": ["prompt"], "summarize": []}
_FIELD_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list[str],
                                "list[int]": list[int], "list[float]": list[float]}


def find_chain_config(name: str) -> Path:
    """NAME as a path, or NAME(.yaml) in configs/chains/ (see CONFIG_DIRS)."""
    found = find_config(name, "configs/chains")
    if found is not None:
        return found
    known = config_names("configs/chains")
    raise ChainConfigError(f"no chain config `{name}`: not a file, and not in {CONFIG_DIRS[0]}/. "
                           f"Known chains: {', '.join(known) or 'none'} (`tunesmith chain list`).")


def load_chain_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ChainConfig:
    """Read and validate a chain YAML; `overrides` ({"model": ..., "params.temperature": 0.5}) win over the file."""
    p = find_chain_config(str(path))
    raw = read_yaml(p, ChainConfigError)
    if not isinstance(raw, dict):
        raise ChainConfigError(f"{p}: must be a mapping of keys (kind: ..., model: ...), got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if sub:
            raw.setdefault(section, {})[sub] = value
        else:
            raw[key] = value
    return build_config(raw, str(p))


def build_config(raw: dict[str, Any], where: str) -> ChainConfig:
    """Key names and types by finetune's config validator (the one for every YAML); then what is chain-specific:
    the keys each kind reads and needs, the generation params' ranges, the extraction field types."""
    try:
        cfg = build_section(ChainConfig, raw, where)
        params = check_values(GenerationParams, cfg.params, where, "params.")  # only the keys set, for the defaults
    except ConfigError as e:
        raise ChainConfigError(str(e)) from None
    _check_kind_keys(raw, cfg.kind, where)
    try:
        GenerationParams(**params)  # its own range checks (temperature >= 0, 0 < top_p <= 1, ...)
    except ValueError as e:
        raise ChainConfigError(f"{where}: params: {e}") from None
    cfg.params = params
    if cfg.kind == "extract":
        extraction_schema(cfg, where)  # bad field types fail now, not at the first run
    if cfg.kind == "classify" and cfg.fallback is not None and cfg.fallback not in cfg.labels:
        raise ChainConfigError(f"{where}: `fallback` {cfg.fallback!r} is not one of the labels {cfg.labels}")
    return cfg


def _check_kind_keys(raw: dict[str, Any], kind: str, where: str) -> None:
    """Another kind's key is an error, not silently ignored; a kind's required keys must be set."""
    for key in raw:
        if key not in _COMMON and key not in _KEYS[kind]:
            owners = [k for k, keys in _KEYS.items() if key in keys]
            raise ChainConfigError(f"{where}: `{key}` is not used by kind: {kind} (it is for {', '.join(owners)}). "
                                   f"Remove it; kind {kind} reads: {', '.join(sorted(_COMMON | _KEYS[kind]))}.")
    for key in _REQUIRED[kind]:
        if not raw.get(key):
            raise ChainConfigError(f"{where}: kind: {kind} needs `{key}` (see configs/chains/ for examples).")


def build_chain(cfg: ChainConfig, model: Any = None, where: str = "chain config") -> Runnable[Any, Any]:
    """The pipeline a config describes. `model` (a chat model) replaces loading `cfg.model`, e.g. in tests."""
    from .chat_model import load_chat_model
    from .extract import extract_chain
    from .pipelines import classify_chain, few_shot_chain, prompt_chain, summarize_chain
    from .rag import rag_chain

    try:
        llm = model or load_chat_model(cfg.model, adapter=cfg.adapter, **cfg.params)
    except ChainModelError as e:
        raise ChainModelError(f"{where}: model: {e}") from e
    if cfg.kind == "rag":
        assert cfg.docs_dir is not None  # checked in build_config
        return rag_chain(resolve_path(cfg.docs_dir), llm, k=cfg.k, prompt=cfg.prompt, index_dir=cfg.index_dir,
                         chunk_size=cfg.chunk_size or 600, chunk_overlap=cfg.chunk_overlap or 80,
                         extractive=cfg.extractive)
    if cfg.kind == "classify":
        shots = [(ex.get("text", ""), ex.get("label", "")) for ex in cfg.examples]
        return classify_chain(llm, cfg.labels, instructions=cfg.instructions, examples=shots, fallback=cfg.fallback)
    if cfg.kind == "extract":
        return extract_chain(llm, extraction_schema(cfg, where), instructions=cfg.instructions,
                             max_retries=cfg.max_retries)
    if cfg.kind == "summarize":
        return summarize_chain(llm, chunk_size=cfg.chunk_size or 2000, chunk_overlap=cfg.chunk_overlap or 100,
                               max_words=cfg.max_words)
    if cfg.kind == "few_shot":
        return few_shot_chain(llm, cfg.examples, instructions=cfg.instructions, input_key=cfg.input_key)
    assert cfg.prompt is not None
    return prompt_chain(llm, cfg.prompt, system=cfg.system, input_key=cfg.input_key)


def main_input_key(cfg: ChainConfig) -> str:
    """The variable `--input` fills."""
    return {"rag": "question", "classify": "text", "extract": "text", "summarize": "text"}.get(cfg.kind, cfg.input_key)


def run_chain(name: str | Path, text: str | None = None, variables: dict[str, Any] | None = None,
              overrides: dict[str, Any] | None = None) -> Any:
    """Load, build and invoke a YAML chain once: `run_chain("classify", "The app crashes")`."""
    cfg = load_chain_config(name, overrides)
    inputs = {**({main_input_key(cfg): text} if text is not None else {}), **(variables or {})}
    return build_chain(cfg, where=str(name)).invoke(inputs)


def extraction_schema(cfg: ChainConfig, where: str) -> type[BaseModel]:
    """`fields: {name: str, age: int?}` -> a Pydantic model class named after the file."""
    spec: dict[str, Any] = {}
    for name, type_name in cfg.fields.items():
        optional = type_name.strip().endswith("?")
        tp = _FIELD_TYPES.get(type_name.strip().rstrip("?").replace(" ", ""))
        if tp is None or not name.isidentifier():
            raise ChainConfigError(f"{where}: fields.{name}: {type_name!r} is not usable. Field names must be "
                                   f"identifiers; types: {', '.join(_FIELD_TYPES)} (add ? for optional).")
        spec[name] = (tp | None, None) if optional else (tp, ...)
    title = "".join(w.capitalize() for w in Path(where).stem.replace("-", "_").split("_")) or "Extraction"
    return create_model(title, **spec)
