"""Random-init models of real published shapes, built in-process from transformers configs (no hub, no files).

Why: speed and memory of a training step or a decode step depend on a model's shapes, not on its weights, and the
GPU machine (benchmarks/gpu.sh) reaches no network and carries no checkpoint. `train_bench.py --shape` and
`chat_bench.py --shape` train and decode these as they would the real checkpoints.

`tiny=True` keeps each family's own features (grouped KV heads, q/k/v bias, head_dim 256 and logit softcapping,
tied or untied embeddings) at a size that builds in a second, for the CPU smoke tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # the config.json of each checkpoint, minus ids, dtype and rope scaling (which change no shape or cost)
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "gemma-2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
                   "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
}
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}


def shape_config(name: str, tokenizer: Any, tiny: bool = False) -> Any:
    """The transformers config of shape `name`, with the tokenizer's special token ids (its vocabulary may be smaller
    than the shape's: the embedding keeps the shape's rows, the unused ones cost what they cost the real model)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise SystemExit(f"--shape {name}: not a known shape; pick one of {', '.join(SHAPES)}")
    kw = dict(SHAPES[name])
    if tiny:
        kw.update(_TINY, vocab_size=len(tokenizer))
        if "head_dim" in kw:
            kw["head_dim"] = 16
        if "query_pre_attn_scalar" in kw:
            kw["query_pre_attn_scalar"] = 16
    kw["vocab_size"] = max(kw["vocab_size"], len(tokenizer))
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return AutoConfig.for_model(kw.pop("model_type"), **kw, **ids)


def build_shape_model(name: str, out: str | Path, tokenizer_dir: str | Path | None = None, tiny: bool = False,
                      seed: int = 0) -> Path:
    """Write a random-init model of shape `name` (bf16 on a GPU, where it is built; fp32 on a CPU) with the tokenizer
    of `tokenizer_dir` (None: the embedded model's; with `tiny`, tunesmith's tiny test tokenizer) to `out`, and
    return `out`. A folder this wrote before with the same arguments is reused (a 7B model is 15 GB to write)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.finetune.tiny import build_tiny_tokenizer

    if tokenizer_dir is None and not tiny:
        from tunesmith.finetune import resolve_base_model

        tokenizer_dir = resolve_base_model("embedded")
    out = Path(out)
    cuda = torch.cuda.is_available()
    stamp = {"shape": name, "tiny": tiny, "tokenizer": str(tokenizer_dir), "seed": seed, "cuda": cuda}
    if (out / "shape.json").exists() and json.loads((out / "shape.json").read_text()) == stamp:
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = shape_config(name, tok, tiny)
    torch.manual_seed(seed)
    with torch.device("cuda" if cuda else "cpu"):  # a 7B model initialises in seconds on the GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "shape.json").write_text(json.dumps(stamp))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def parameters(name: str) -> int:
    """Parameters of the full-size shape, counted on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoModelForCausalLM

    class _Vocab:  # what shape_config reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

        def __len__(self) -> int:
            return 0

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name, _Vocab()))
    return sum(p.numel() for p in model.parameters())


def describe(name: str, tiny: bool = False) -> str:
    """`llama-3.2-1b shape (random init, 1.24B parameters)`-style label for the tables."""
    if tiny:
        return f"{name} (tiny random model of its family)"
    return f"{name} shape (random init, {parameters(name) / 1e9:.2f}B parameters)"
