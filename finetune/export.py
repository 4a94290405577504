"""Export a run as one GGUF file for llama.cpp and Ollama, written in pure Python and checked before it is kept.

The adapter is merged in fp32 and written with the `gguf` package's writer: no llama.cpp build, no network. The
file is then read back by transformers (`gguf_file=`) and its logits compared with the merged model, and, when the
`xllamacpp` wheel is installed, llama.cpp itself answers a probe conversation through the embedded chat template
(finetune/llamacpp.py). A file that fails a check is deleted: a GGUF that loads but answers differently is worse
than none. Next to it go an Ollama `Modelfile` (finetune/modelfile.py) and, in the run folder, a model card.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from .errors import ExportError
from .gguf_tokenizer import add_tokenizer, tokenizer_metadata

log = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0", "q4_0")

MIN_AGREEMENT = {"f16": 1.0, "bf16": 1.0, "q8_0": 0.85, "q4_0": 0.4}
"""Share of probe positions where the GGUF read back by transformers picks the same top-1 token as the merged
model. f16 and bf16 must agree everywhere but at near-ties (`TIE`); the quantised types lose more bits, so they
must agree at this share of positions. Measured on SmolLM2-135M (46 positions): q8_0 93%, q4_0 52% (a 135M model
is fragile at 4 bits); on the tiny random test Llama: q8_0 96%, q4_0 64%. A file with the q/k permutation wrong, or
a wrong tokenizer, agrees at a few percent: these floors catch broken files, not quantisation loss."""

TIE = 0.005
"""For f16/bf16: a position where the GGUF's pick is within this share of the row's logit range of the merged
model's best logit counts as agreeing: rounding weights to 16 bits can flip two tokens that are tied that closely
(one of 56 positions of a tiny random Qwen2 did, by 0.002)."""

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""transformers model_type -> llama.cpp architecture name. llama.cpp runs Mistral 7B as `llama`."""

_PERMUTED = {"llama"}
"""llama.cpp's `llama` rotates interleaved pairs of q/k dimensions, transformers rotates halves: q_proj and k_proj
rows are permuted on export (as convert_hf_to_gguf.py does; transformers' GGUF loader undoes it). Qwen uses the
half-rotation (NEOX) layout in both, so its weights go as they are."""

PROBE = [{"role": "user", "content": "Which standard-library module defines `dumps`?"}]
PROBE_ANSWER = "The json module defines dumps."


@dataclass
class ExportResult:
    """What `export_gguf` wrote and how well the file reproduces the merged model."""

    path: str
    quant: str
    size_bytes: int
    agreement: float
    """Share of probe positions whose top-1 token the GGUF (read by transformers) shares with the merged model."""
    positions: int
    max_abs_logit_diff: float
    pre_tokenizer: str
    llamacpp: dict[str, Any] | None = None
    """llama.cpp's check (its greedy answer, the transformers answer, stop reason), or None without xllamacpp."""
    modelfile: str | None = None
    model_card: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_gguf(source: str | os.PathLike[str], quant: str = "f16", out: str | os.PathLike[str] | None = None,
                llamacpp_check: bool = True) -> ExportResult:
    """Merge `source` (a finished run, a merged folder, `embedded`, ...) and write a verified GGUF; see module doc."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r} is not supported; pick one of {', '.join(QUANTS)}.")
    _target(out, quant)
    loaded, model = _load_merged(source)
    cfg = model.config
    arch = _architecture(cfg, loaded.name)
    target = _target(out, quant, loaded)
    meta = tokenizer_metadata(loaded.tokenizer, cfg.vocab_size, _eos_ids(model, loaded.tokenizer))
    system = (loaded.config.get("data") or {}).get("system_prompt") or None
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tunesmith-export-", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        _write(tmp, model, arch, quant, meta, loaded.name)
        try:
            res = _check_transformers(tmp, model, loaded.tokenizer, meta, quant, system)
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as e:  # transformers' GGUF reader refused the file: as much a failed check as a wrong logit
            raise ExportError(f"transformers cannot read {target.name} back ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); deleted.") from e
        if llamacpp_check:
            from .llamacpp import check_llamacpp, llamacpp_available

            if llamacpp_available():
                res.llamacpp = check_llamacpp(tmp, model, loaded.tokenizer, quant, system)
            else:
                res.notes.append("llama.cpp check skipped: install the `xllamacpp` wheel (pip install xllamacpp) to "
                                 "have llama.cpp itself load the file and answer a probe conversation.")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    res.path, res.size_bytes = str(target), target.stat().st_size
    from .modelfile import write_modelfile

    res.modelfile = write_modelfile(target, loaded.tokenizer, meta, system)
    if loaded.run_dir is not None:
        from .card import write_model_card

        res.model_card = str(write_model_card(loaded.run_dir, gguf=res))
    return res


def _load_merged(source: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The run's model with its adapter merged in fp32 (exact: no rounding before the file's own dtype)."""
    from .model import is_run_dir, load_run, resolve_source

    src = resolve_source(source)
    if src.kind == "run" and not is_run_dir(src.location):
        raise ExportError(f"{src.location} is not a finished run: it has no adapter/adapter_config.json (is it still "
                          f"training, or was it killed?). Finish it with `tunesmith train {src.location}/config.yaml "
                          "--resume`, then export.")
    loaded = load_run(source, dtype=torch.float32, device="cpu")
    model = loaded.model
    if isinstance(model, PeftModel):
        with torch.no_grad():
            model = model.merge_and_unload()
    model.eval()
    return loaded, model


def _architecture(cfg: Any, name: str) -> str:
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHITECTURES:
        raise ExportError(f"{name} is a `{mt}` model; GGUF export supports {', '.join(ARCHITECTURES)} (llama.cpp's "
                          "llama, qwen2 and qwen3 architectures). Serve this one with the default transformers engine, "
                          "or merge it (`tunesmith merge RUN`) and convert with llama.cpp's convert_hf_to_gguf.py.")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ExportError(f"{name} uses `{rope.get('rope_type')}` RoPE scaling, which tunesmith's GGUF export does not "
                          "write yet (llama.cpp needs a rope_freqs tensor for it). Use llama.cpp's convert_hf_to_gguf.py "
                          "on the merged folder (`tunesmith merge RUN`).")
    window = getattr(cfg, "sliding_window", None)
    if window and window < cfg.max_position_embeddings:
        raise ExportError(f"{name} attends through a {window}-token sliding window; llama.cpp's `llama` architecture "
                          "attends to the whole context, so answers longer than the window would differ. Not exported.")
    return ARCHITECTURES[mt]


def _target(out: str | os.PathLike[str] | None, quant: str, loaded: Any = None) -> Path:
    """Where the file goes, checked writable. Called twice: before the model loads, for an `--out` file (a mistyped
    path fails in a second, not after the merge), and after, when the default name needs the model's name."""
    from .model import cache_dir

    target = Path(out).expanduser() if out else Path(".")
    if loaded is not None and (out is None or target.is_dir()):
        home = loaded.run_dir or (Path(loaded.base_model) if Path(loaded.base_model).is_dir() else
                                  cache_dir() / "export")
        name = f"{loaded.name}-{quant}.gguf"
        target = target / name if out else Path(home) / "gguf" / name
    elif out is None or target.is_dir():
        return target  # the file name comes from the model: checked once it is loaded
    if target.suffix != ".gguf":
        raise ExportError(f"--out {target}: a GGUF file name must end in .gguf (or pass a folder).")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {target.parent} for the GGUF ({e.strerror}). Pass a writable --out.") from None
    if not os.access(target.parent, os.W_OK):
        raise ExportError(f"{target.parent} is not writable, so {target.name} cannot be written there. Pass a "
                          "writable --out, e.g. --out ./model.gguf.")
    return target.resolve()


def _eos_ids(model: Any, tok: Any) -> list[int]:
    """The tokens that end an answer, as `Generator` stops on them: the tokenizer's EOS and generation_config's."""
    ids = [tok.eos_token_id]
    g = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += g if isinstance(g, list) else [g]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor: norms and biases stay f32, as llama.cpp expects."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if data.ndim == 1:
        return data.astype(np.float32), None
    qtype = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    if qtype == T.Q4_0 and name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0  # the head (tied to the embedding in small models) drives every token choice: keep 8 bits
    if qtype in (T.Q8_0, T.Q4_0) and data.shape[-1] % 32:
        qtype = T.F16  # blocks of 32 values: a row that does not split into them stays f16 (convert_hf_to_gguf too)
    if qtype == T.F16:
        return data.astype(np.float16), None
    return quantize(data, qtype), qtype


def _write(path: Path, model: Any, arch: str, quant: str, meta: dict[str, Any], name: str) -> None:
    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    theta: Any = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, meta)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd as the head when there is no output.weight
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no llama.cpp tensor name for {hf_name} in a `{arch}` model: this checkpoint has "
                              "weights tunesmith's export does not know. Not exported.")
        data = t.detach().float().cpu().numpy()
        if arch in _PERMUTED and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch in _PERMUTED and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        arr, raw = _encode(new, data, quant)
        w.add_tensor(new, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def probe_ids(tok: Any, system: str | None) -> list[int]:
    """The probe conversation (with the run's system prompt) and an answer, as the run's template renders it."""
    msgs = ([{"role": "system", "content": system}] if system else []) + PROBE
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else "Q: "
    return tok(text + PROBE_ANSWER, add_special_tokens=False)["input_ids"]


def _check_transformers(path: Path, model: Any, tok: Any, meta: dict[str, Any], quant: str,
                        system: str | None) -> ExportResult:
    """Read the file back with transformers and gguf.GGUFReader; any difference raises ExportError."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fields = GGUFReader(str(path)).fields
    have = {k: fields[k].contents() if k in fields else None
            for k in ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")}
    want = {"tokenizer.ggml.pre": meta["pre"], "tokenizer.ggml.eos_token_id": meta["eos"],
            "tokenizer.chat_template": meta["chat_template"]}
    bad = [f"{k}: file has {str(have[k])[:60]!r}, run has {str(want[k])[:60]!r}" for k in want if have[k] != want[k]]
    if bad:
        raise ExportError(f"{path.name} was not written as intended ({'; '.join(bad)}); deleted.")
    ids = probe_ids(tok, system)
    g_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = tok.decode(ids)
    g_ids = g_tok(text, add_special_tokens=False)["input_ids"]
    if g_ids != ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, g_ids)) if a != b), min(len(ids), len(g_ids)))
        raise ExportError(f"{path.name}: its tokenizer splits the probe text differently from the run's at token {at} "
                          f"({tok.convert_ids_to_tokens(ids[at:at + 3])} vs {g_tok.convert_ids_to_tokens(g_ids[at:at + 3])}); "
                          "the model would read other tokens than it was trained on. Deleted.")
    g_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        x = torch.tensor([ids])
        a, b = model(input_ids=x).logits[0].float(), g_model(input_ids=x).logits[0].float()
    best, pick = a.max(-1).values, b.argmax(-1)
    same = a.argmax(-1) == pick
    if quant in ("f16", "bf16"):  # near-ties count: see TIE
        same |= best - a.gather(-1, pick[:, None])[:, 0] <= TIE * (best - a.min(-1).values)
    agree = float(same.float().mean())
    diff = float((a - b).abs().max())
    if agree < MIN_AGREEMENT[quant]:
        raise ExportError(f"{path.name} ({quant}) read back by transformers picks the merged model's top token at only "
                          f"{agree:.0%} of {len(ids)} probe positions (need >= {MIN_AGREEMENT[quant]:.0%}; max |logit "
                          f"diff| {diff:.3g}). Deleted; try a wider type (--quant f16).")
    return ExportResult(str(path), quant, path.stat().st_size, agree, len(ids), diff, meta["pre"])
