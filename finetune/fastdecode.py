"""A compiled decode step for single-stream generation (`load_generator(..., compile_decode=True)`,
`tunesmith chat|serve|ui --compile-decode`).

Why: on a CPU, once the weights are int8 (finetune/quantize.py), an eager decode step of SmolLM2-135M spends more
time in PyTorch's per-op overhead (~1,500 small ops: norms, RoPE, residual adds, a growing KV cache's `cat`) than in
its matmuls. `torch.compile` of the whole forward over a static KV cache fuses those ops into a few C++ loops per
layer. Measured on an idle 2-core AMD EPYC (AVX2), int8 weights: eager 58-66 ms a token, compiled 33-40 ms.

How: transformers' own compiled decode (`generate(..., compile_config=...)` over a `StaticCache`): prompts (prefill)
run eager, every later step calls the compiled forward. Three choices keep it cheap:
- The cache length is rounded up to a power of two (at least `MIN_CACHE`), so a process compiles a few shapes.
- Guards on the model's tensors and module identities are dropped (`keep_guard`): checking ~7,000 of them cost
  ~2 ms a token. Guards on plain attribute values stay, so switching the adapter off recompiles instead of
  silently decoding with it. The Generator's model must not be swapped or re-weighted afterwards (int8 decode
  weights already ask that).
- A one-token query attends on the grouped key/value heads (`grouped_sdpa`): under torch.compile transformers'
  SDPA path repeats them instead, copying the whole static cache per layer and token (~2.7 ms a token here).
- Only one prompt at a time, with the adapter as loaded: batches have their own shapes and already run ~6x the
  single-stream rate eagerly; base-model answers (`use_adapter=False`) run eager.

The first compile takes ~1 min on two cores and ~20 s once inductor's kernels are cached on disk
(`cache_dir()/inductor`); the Generator pays it at load time (a 3-token answer), not on a user's first answer.
"""

from __future__ import annotations

from typing import Any

from .loss import _causal  # the one 'causal LM under the PEFT wrapper' helper

MIN_CACHE = 512
"""The smallest static KV cache (positions), the one compiled at load: a prompt plus the default 256 new tokens
usually fits, and attention over 512 positions costs ~3 ms a token (SmolLM2-135M). A longer conversation moves to
1,024, 2,048, ... positions, each compiled once per process when first needed (~20 s with a warm kernel cache)."""

DROP_GUARDS = frozenset({
    "TENSOR_MATCH", "ID_MATCH", "TYPE_MATCH", "CLOSURE_MATCH", "DICT_CONTAINS", "DICT_NOT_CONTAINS", "DICT_LENGTH",
    "DICT_KEYS_MATCH", "DICT_VERSION", "EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT", "HASATTR",
    "NO_HASATTR", "DUPLICATE_INPUT", "SEQUENCE_LENGTH", "NN_MODULE_PARAM_NAMES", "NO_TENSOR_ALIASING",
})
"""Guard kinds dropped on the model's modules: identities, tensor metadata and container shapes (they cannot change
under a Generator). Value guards (CONSTANT_MATCH, EQUALS_MATCH: an adapter switched off, a config flag) stay."""


ATTENTION = "tunesmith_sdpa"
"""The attention the compiled model runs: transformers' SDPA, except `grouped_sdpa` for one-token queries."""


def grouped_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any) -> tuple[Any, None]:
    """One query token of a model with grouped key/value heads: its query heads are folded onto the key/value heads,
    as transformers does eagerly (`pack_gqa`), so the cache is read once and never repeated; anything else goes
    to transformers' own SDPA."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or groups == 1 or per_head_mask or kw.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    b, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(query.reshape(b, heads // groups, groups, dim), key, value,
                                         attn_mask=attention_mask, scale=kw.get("scaling"))
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def keep_guard(entries: list[Any]) -> list[bool]:
    """`guard_filter_fn` for torch.compile (entries are `torch._dynamo.types.GuardFilterEntry`)."""
    return [not (e.orig_guard.source.is_unspecialized_nn_module() and e.guard_type in DROP_GUARDS) for e in entries]


def cache_length(needed: int, limit: int | None) -> int:
    """Static cache positions for a prompt + answer of `needed` tokens: a power of two, within the context."""
    n = MIN_CACHE
    while n < needed:
        n *= 2
    return max(needed, min(n, limit)) if limit else n


def why_not(model: Any) -> str | None:
    """Why `model` (a causal LM, or its peft wrapper) cannot decode compiled here, or None."""
    from .compiling import compiler

    base = _causal(model)
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} does not support a static KV cache in transformers"
    if next(model.parameters()).device.type == "cpu" and compiler() is None:
        return "no C++ compiler found (install g++, or set CXX)"
    return None


class CompiledDecode:
    """What `Generator._run` adds to a single prompt's `generate` call to decode through the compiled step."""

    def __init__(self, model: Any) -> None:
        from transformers import AttentionInterface, CompileConfig
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        from .compiling import use_cache_dir

        use_cache_dir()
        self.model = model
        base = _causal(model)
        if base.config._attn_implementation == "sdpa":
            AttentionInterface.register(ATTENTION, grouped_sdpa)
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)
            base.set_attn_implementation(ATTENTION)
        # mode=None: CompileConfig's default mode cannot go with options (torch.compile takes one or the other)
        self.config = CompileConfig(fullgraph=False, dynamic=False, mode=None,  # type: ignore[arg-type]
                                    options={"guard_filter_fn": keep_guard})
        self.config._compile_all_devices = True  # type: ignore[assignment]  # transformers compiles on CPUs if told

    def kwargs(self, needed: int, limit: int | None) -> dict[str, Any]:
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=cache_length(needed, limit))
        return {"cache": cache, "compile_config": self.config}
