"""Write a Hugging Face BPE tokenizer into a GGUF file the way llama.cpp reads it.

llama.cpp re-implements tokenization in C++: it needs the byte-level vocabulary, the merges, the special token ids
and, for BPE, the *name* of the pre-tokenizer (the regex that splits text before merging), because it cannot run
the tokenizer.json's regex itself. A wrong name does not fail loudly: llama.cpp tokenizes differently and the model
answers worse. So the name is derived exactly as llama.cpp's own convert_hf_to_gguf.py does (a hash of the token
ids of a fixed test string), and an unknown tokenizer is refused instead of guessed.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Any

from .errors import ExportError

CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
"""llama.cpp's test string (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids identify a pre-tokenizer."""

KNOWN_PRE: dict[str, str] = {
    # sha256(str(tokenizer.encode(CHKTXT))) -> llama.cpp's name, for the families tunesmith exports
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama-3 fine-tunes
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}

_GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
"""A bare GPT-2 ByteLevel pre-tokenizer: llama.cpp's "gpt-2" splits exactly like it, whatever the vocabulary."""

_SPLIT_REGEXES = {
    # a Split(regex) + ByteLevel(use_regex=False) pre-tokenizer -> the llama.cpp name that implements that regex;
    # transformers gives every `qwen2` tokenizer Qwen's regex, so a retrained Qwen vocabulary still splits as "qwen2"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
}

# gguf.TokenType values (kept literal so this module imports without gguf)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def pre_tokenizer_name(tok: Any) -> str:
    """llama.cpp's name for `tok`'s pre-tokenizer. Known hashes first (as convert_hf_to_gguf.py); then, for a
    vocabulary llama.cpp has never seen (a retrained or tiny tokenizer), the split itself: a plain GPT-2 ByteLevel
    split is "gpt-2", Qwen's and Llama 3's regexes are "qwen2" and "llama-bpe". Anything else is refused."""
    digest = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    spec = _backend_json(tok)
    pre = spec.get("pre_tokenizer") or {}
    if all(pre.get(k) == v for k, v in _GPT2_SPLIT.items()) and not spec.get("normalizer"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex")):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        name = _SPLIT_REGEXES.get(regex) if isinstance(regex, str) else None
        if name:
            return name
    raise ExportError(
        f"llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest[:16]}..., pre_tokenizer "
        f"{json.dumps(pre)[:200]}): it would split text differently from transformers and the exported model would "
        "read other tokens than it was trained on. Supported: the Llama 3, Qwen2/3, SmolLM/SmolLM2, Mistral Nemo and "
        "GPT-2 tokenizers. Export with transformers-side serving instead (`tunesmith merge RUN`)."
    )


def _backend_json(tok: Any) -> dict[str, Any]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tok).__name__} is a slow (Python) tokenizer: GGUF export needs a fast tokenizer "
                          "(tokenizer.json). Save the run's tokenizer with transformers' fast tokenizer.")
    return json.loads(backend.to_str())


def tokenizer_metadata(tok: Any, vocab_size: int, eos_ids: list[int]) -> dict[str, Any]:
    """Everything llama.cpp and transformers' GGUF reader need about `tok`, as plain values (written by
    `add_tokenizer`, compared by the export check). `vocab_size` is the model's embedding rows: ids past the
    tokenizer's are padding rows, written as unused `[PAD{i}]` tokens as convert_hf_to_gguf.py does."""
    spec = _backend_json(tok)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise ExportError(f"the tokenizer is {model.get('type')}, not byte-level BPE: GGUF export supports the BPE "
                          "tokenizers of Llama 3, Qwen, SmolLM2 and Mistral Nemo (SentencePiece Llama 2 / Mistral 7B "
                          "tokenizers are not supported yet).")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                          "embedding rows: the run's tokenizer does not belong to its model.")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((_CONTROL if added[i].get("special") else _USER_DEFINED) if i in added else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eos = tok.eos_token_id if tok.eos_token_id is not None else (eos_ids[0] if eos_ids else None)
    others = [i for i in eos_ids if i != eos]
    probe = tok("a")["input_ids"]
    return {
        "pre": pre_tokenizer_name(tok), "tokens": tokens, "types": types, "merges": merges,
        "bos": tok.bos_token_id, "eos": eos, "eot": others[0] if others else eos,
        "unk": tok.unk_token_id, "pad": tok.pad_token_id,
        "add_bos": bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }


def add_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    """Write `tokenizer_metadata(...)` with the gguf writer (keys as llama.cpp's convert_hf_to_gguf.py writes them)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("unk", writer.add_unk_token_id),
                     ("pad", writer.add_pad_token_id)):
        if meta[key] is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
