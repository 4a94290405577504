"""A tiny random Llama model with a real BPE tokenizer and ChatML template, built in-process in about a second.

Tests, CI benchmark smoke runs and examples use it so that nothing needs the network or the 135M model.
"""

from __future__ import annotations

from pathlib import Path

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


def build_tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
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


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    pad_is_eos: bool = False,
) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer folder and return its path.

    `pad_is_eos` reproduces the SmolLM2 setup (pad token == EOS), the classic case where masking pad labels
    silently stops the model from learning to end its turn.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer(vocab_size)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(
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
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
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
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(out / "adapter")
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.save_pretrained(out / "tokenizer")
    (out / "chat_template.jinja").write_text(tok.chat_template or "")
    (out / "config.yaml").write_text(yaml.safe_dump({"base_model": str(base_dir), "output_dir": str(out)}))
    return out
