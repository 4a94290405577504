"""A compiled decode step for generation (`load_generator(..., compile_decode=True)`,
`tunesmith chat|serve|ui --compile-decode`).

Why: on a CPU, once the weights are int8 (finetune/quantize.py), an eager decode step of SmolLM2-135M spends more
time in PyTorch's per-op overhead (~1,500 small ops: norms, RoPE, residual adds, a growing KV cache's `cat`) than in
its matmuls. `torch.compile` of the whole forward over a static KV cache fuses those ops into a few C++ loops per
layer. Measured on an idle 2-core AMD EPYC (AVX2), int8 weights: eager 58-66 ms a token, compiled 33-40 ms.

How: transformers' own compiled decode (`generate(..., compile_config=...)` over a `StaticCache`): prompts (prefill)
run eager, every later step calls the compiled forward. These choices keep it cheap:
- The cache holds the prompt plus the answer's `max_new_tokens`, rounded up to `CACHE_STEP`, and its length is a
  symbolic size in the compiled step: dynamo compiles a first graph for the first length it sees, then, at the
  next other length, one more with the length symbolic that serves every later one. Attention reads the whole
  cache every token, so a cache sized to the answer instead of a fixed 512 positions matters: measured on an idle
  2-core AMD EPYC (AVX2), int8 weights, 96-token answers (prefill included): 55 tokens/s with a static
  512-position cache, 83 with this.
- Guards on the model's tensors and module identities are dropped (`keep_guard`): checking ~7,000 of them cost
  ~2 ms a token. Guards on plain attribute values stay, so switching the adapter off recompiles instead of
  silently decoding with it. The Generator's model must not be swapped or re-weighted afterwards (int8 decode
  weights already ask that).
- A one-token query attends on the grouped key/value heads (`grouped_sdpa`): under torch.compile transformers'
  SDPA path repeats them instead, copying the whole static cache per layer and token (~2.7 ms a token here).
- With continuous batching (finetune/continuous.py, a Generator's default) this same compiled forward is its
  decode step (`step()`), over its own cache and 4-D mask: the row count is one more symbolic size, in a third
  graph that serves every batch size (dynamo specializes a size of one, so a lone answer keeps its own two
  graphs); `ContinuousBatcher.warm_up` compiles all three. Without it, left-padded `generate` batches
  (`Generator.batch`) go through `generate`'s own compiled step, over a `StaticCache` (`kwargs()`, `warm_up()`).
- Only with the adapter as loaded: base-model answers (`use_adapter=False`) run eager.

All three graphs are compiled at load (`warm_up`, three short answers), never during a user's answer: ~2.5 min on
two cores the first time, ~30 s once inductor's kernels are cached on disk (`cache_dir()/inductor`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import compiling
from .loss import _causal  # the one 'causal LM under the PEFT wrapper' helper

CACHE_STEP = 64
"""Cache lengths are multiples of this: one divisibility class for the symbolic length's kernels."""

DROP_GUARDS = frozenset({
    "TENSOR_MATCH", "ID_MATCH", "TYPE_MATCH", "CLOSURE_MATCH", "DICT_CONTAINS", "DICT_NOT_CONTAINS", "DICT_LENGTH",
    "DICT_KEYS_MATCH", "DICT_VERSION", "EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT", "HASATTR",
    "NO_HASATTR", "DUPLICATE_INPUT", "SEQUENCE_LENGTH", "NN_MODULE_PARAM_NAMES", "NO_TENSOR_ALIASING",
})
"""Guard kinds dropped on the model's modules: identities, tensor metadata and container shapes (they cannot change
under a Generator). Value guards (CONSTANT_MATCH, EQUALS_MATCH: an adapter switched off, a config flag) stay."""


GRAPHS_PER_MODEL = 4
"""Graphs one model's compiled decode may add (three, `warm_up`; one spare). Every model class's forward runs
through one wrapper function of transformers (`deprecate_kwarg`'s), and dynamo keeps at most `recompile_limit` (8)
graphs per function in a process: `serve --compile-decode` with a fourth model of another shape decoded its batches
eager (seen: 4 tiny models of widths 64-160 in one process, "hit config.recompile_limit (8)"). So each CompiledDecode
adds this many to the limit (`compiling.add_graphs`), raised in every thread that runs a compiled step
(`compiling.room_for_graphs`). Models of the same shapes (runs of one base model) share graphs."""

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
    """Static cache positions for a prompt + answer of `needed` tokens: a multiple of CACHE_STEP, within the
    context."""
    n = -(-needed // CACHE_STEP) * CACHE_STEP
    return max(needed, min(n, limit)) if limit else n


def why_not(model: Any) -> str | None:
    """Why `model` (a causal LM, or its peft wrapper) cannot decode compiled here, or None."""
    base = _causal(model)
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} does not support a static KV cache in transformers"
    if next(model.parameters()).device.type == "cpu" and compiling.compiler() is None:
        return "no C++ compiler found (install g++, or set CXX)"
    return None


class CompiledDecode:
    """What `Generator._run` adds to a `generate` call to decode through the compiled step."""

    def __init__(self, model: Any) -> None:
        from transformers import AttentionInterface, CompileConfig
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        compiling.use_cache_dir()
        compiling.wait_for_cpu_probe()
        compiling.add_graphs(GRAPHS_PER_MODEL)
        self.model = model
        base = _causal(model)
        if base.config._attn_implementation == "sdpa":
            AttentionInterface.register(ATTENTION, grouped_sdpa)
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)
            base.set_attn_implementation(ATTENTION)
        # mode=None: CompileConfig's default mode cannot go with options (torch.compile takes one or the other)
        # dynamic=None: dynamo's automatic dynamic shapes (the cache length turns symbolic once it changes)
        self.config = CompileConfig(fullgraph=False, dynamic=None, mode=None,  # type: ignore[arg-type]
                                    options={"guard_filter_fn": keep_guard})
        self.config._compile_all_devices = True  # type: ignore[assignment]  # transformers compiles on CPUs if told
        self._length: int | None = None

    def warm_up(self, answer: Callable[[int], object], limit: int | None) -> None:
        """Compile all three graphs now: `answer(n)` (a short answer to n prompts through `Generator._run`) runs for
        one prompt at a first and a second cache length, then for a batch (module docstring)."""
        lengths = sorted({cache_length(n, limit) for n in (1, CACHE_STEP + 1) if limit is None or n <= limit})
        for prompts, length in [(1, n) for n in lengths] + [(2, lengths[-1])]:
            self._length = length
            try:
                answer(prompts)
            finally:
                self._length = None

    def step(self) -> Callable[..., Any]:
        """The compiled forward itself (transformers' `get_compiled_call`), for continuous batching's decode steps."""
        call = _causal(self.model).get_compiled_call(self.config)

        @functools.wraps(call)
        def step(**kwargs: Any) -> Any:
            compiling.room_for_graphs()  # the batch loop's thread is a new one each time it starts
            return call(**kwargs)

        return step

    def kwargs(self, needed: int, limit: int | None) -> dict[str, Any]:
        from transformers import StaticCache

        length = max(needed, self._length or cache_length(needed, limit))
        compiling.room_for_graphs()  # in the thread that calls `generate`, as it runs the compiled call
        return {"cache": StaticCache(config=self.model.config, max_cache_len=length), "compile_config": self.config}
