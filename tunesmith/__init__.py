"""tunesmith: fine-tune a causal LM with LoRA on your data, then chat, serve and chain it."""

__version__ = "0.1.0"
