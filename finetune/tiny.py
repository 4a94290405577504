"""Tiny random causal LMs (Llama by default, or any of FAMILIES) with a real tokenizer and ChatML template, built
in-process in about a second.

Tests, CI benchmark smoke runs and examples use it so that nothing needs the network or the 135M model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import CHATML_TEMPLATE

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "The json module encodes and decodes JSON. The os module talks to the operating system.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Question: what is two plus two? Answer: four.",
    "system user assistant You are a helpful assistant.",
]


def build_tiny_tokenizer(vocab_size: int = 512, kind: str = "bpe"):
    """A small trained tokenizer with the ChatML special tokens and template.

    `kind="bpe"`: GPT-2 style ByteLevel BPE, what the tiny model ships (pinned test losses depend on it exactly).
    `kind="metaspace"`: SentencePiece style (Llama 2, Mistral): spaces become "▁" and every piece of text between
    special tokens gets a leading "▁", so a turn tokenized on its own gives other ids than the same turn inside the
    whole conversation. Tests of the label masks use it to catch exactly that. Characters outside printable ASCII
    become the unk token <|endoftext|> (no byte fallback: enough for tests, not for real text).
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = sorted(set(string.printable) - {" "}) + ["▁"]
    else:
        raise ValueError(f"build_tiny_tokenizer: unknown kind {kind!r}. Use 'bpe' or 'metaspace'.")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


_WINDOW = 8
"""Sliding window of the tiny sliding-window families: shorter than the test examples, so the window really cuts."""

_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    # model_type -> what differs from the shared tiny shape: each family's distinctive feature switched on, and
    # tie_word_embeddings as its small checkpoints ship
    "llama": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": _WINDOW, "tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},  # q/k/v projections with bias
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},  # per-head q/k RMSNorm
    # gemma2 ships final_logit_softcapping=30, but a random tiny head's logits are < 1, where tanh(x/30)*30 is x within
    # 4e-4: a cap of 1 makes the softcapping bend them, so a loss that skips it is caught
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": _WINDOW, "final_logit_softcapping": 1.0,
               "attn_logit_softcapping": 50.0, "tie_word_embeddings": True},  # layers alternate sliding / full
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": _WINDOW,
                    "sliding_window_pattern": 2, "tie_word_embeddings": True},  # ships without logit softcapping
    "phi3": {"partial_rotary_factor": 0.75, "tie_word_embeddings": False},  # fused qkv_proj and gate_up_proj
    "granite": {"logits_scaling": 4.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0625, "tie_word_embeddings": True},
    "cohere": {"logit_scale": 0.0625, "use_qk_norm": True, "tie_word_embeddings": True},  # LayerNorm, parallel block
    "olmo2": {"tie_word_embeddings": False},  # norms after attention/MLP, q/k RMSNorm over all heads
    "smollm3": {"no_rope_layer_interval": 2, "tie_word_embeddings": True},  # every 2nd layer without RoPE (NoPE)
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                  "tie_word_embeddings": False},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
}

FAMILIES = tuple(_FAMILY_CONFIG)
"""Architectures `build_tiny_model` can build (transformers `model_type` names)."""


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    pad_is_eos: bool = False,
    family: str = "llama",
    tokenizer: str = "bpe",
) -> Path:
    """Write a tiny random causal LM of `family` (one of FAMILIES) + tokenizer folder and return its path.

    Every family gets the same tiny shape (2 layers, 4 heads, 2 KV heads) so the architecture matrix tests run in
    seconds; `tokenizer` is the `build_tiny_tokenizer` kind (`bpe` or `metaspace`).
    `pad_is_eos` reproduces the SmolLM2 setup (pad token == EOS), the classic case where masking pad labels
    silently stops the model from learning to end its turn.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in _FAMILY_CONFIG:
        raise ValueError(f"family={family!r}: not a tiny family; pick one of {', '.join(FAMILIES)}.")
    out = Path(out_dir)
    tok = build_tiny_tokenizer(vocab_size, kind=tokenizer)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    cfg = AutoConfig.for_model(
        family,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **_FAMILY_CONFIG[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_run(out_dir: str | Path, base_dir: str | Path, seed: int = 0) -> Path:
    """A run folder (as `tunesmith train` writes it) whose LoRA weights are random but non-zero, so the tuned model
    answers differently from the base. For tests of everything that loads runs, without training first."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)  # before get_peft_model: lora_A's init must not depend on which tests ran first
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(str(out / "adapter"))  # peft types the folder as str
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.save_pretrained(out / "tokenizer")
    (out / "chat_template.jinja").write_text(tok.chat_template or "")
    (out / "config.yaml").write_text(yaml.safe_dump({"base_model": str(base_dir), "output_dir": str(out)}))
    return out
