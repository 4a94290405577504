"""The prefix cache: prompts that start with an earlier prompt or answer reuse its keys/values and still answer
token for token as they would alone; the cache keeps the longest entries within its budget."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_continuous import _alone, _prompt  # tests/finetune is on sys.path (pytest's rootdir-relative import)

from tunesmith.finetune.continuous import Answer, ContinuousBatcher
from tunesmith.finetune.generate import GenerationParams, Generator
from tunesmith.finetune.prefixes import PrefixCache


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(3, n, 4), torch.randn(3, n, 4)) for _ in range(layers)]


def test_one_prefill_mixes_prefix_lengths_and_each_answer_is_as_alone(tiny_gen: Generator) -> None:
    """After one prompt (A) answered, four newcomers are prefilled in one forward: one shares 20 tokens of A, one
    starts with A's whole prompt, one is A again (only its last token is computed), one shares nothing. Then a next
    turn continues A's answer. Every answer equals `generate` on its prompt alone, and exactly the shared tokens were
    reused."""
    model = tiny_gen.model
    batcher = ContinuousBatcher(model)
    a = _prompt(30, 0)
    first = Answer(list(a), 5, set())
    batcher.submit(first).result()
    group = {"b1": a[:20] + _prompt(10, 1), "b2": a + _prompt(6, 2), "b3": list(a), "b4": _prompt(25, 3)}
    shared = {"b1": 20, "b2": 30, "b3": 29, "b4": 0}
    assert _prompt(10, 1)[0] != a[20] and _prompt(6, 2)[0] != first.new[0] and _prompt(25, 3)[0] != a[0]
    answers = {k: Answer(ids, 12, set()) for k, ids in group.items()}
    widths: list[int] = []
    prefill = batcher._prefill
    batcher._prefill = lambda g, b: (widths.append(len(g)), prefill(g, b))[1]  # type: ignore[method-assign]

    def on_carrier(new: list[int]) -> None:
        if len(new) == 2:  # inside the loop: all four wait for the next admit, one group
            for ans in answers.values():
                batcher.submit(ans)

    reused = batcher.prefixes.reused
    batcher.submit(Answer(_prompt(8, 9), 20, set(), on_tokens=on_carrier)).result()
    for ans in answers.values():
        ans.done.result(timeout=60)
    assert widths == [1, 4]
    assert batcher.prefixes.reused - reused == sum(shared.values())
    b3_fed = answers["b3"].ids + answers["b3"].new[:-1]
    turn = a + first.new + _prompt(6, 4)  # the conversation so far, then the user's next words
    nxt = Answer(turn, 10, set())
    reused = batcher.prefixes.reused
    batcher.submit(nxt).result()
    # b3 (A's prompt again) answered as A did and fed back 11 of its tokens, so the cache holds all of A's 5 new
    # tokens (A's own entry held 4: an answer's last token is never fed)
    assert b3_fed[: len(a) + 5] == a + first.new
    assert batcher.prefixes.reused - reused == len(a) + len(first.new)
    with torch.inference_mode():
        assert first.new == _alone(model, a, 5)
        for key, ans in answers.items():
            assert ans.new == _alone(model, group[key], 12), key
        assert nxt.new == _alone(model, turn, 10)


def test_a_chat_turn_reuses_the_conversation(tiny_gen: Generator, tiny_run_dir: Any) -> None:
    """Through the Generator: the second turn of a chat computes only its new tokens, answers as without the cache,
    and `clear_prefix_cache` forgets."""
    from tunesmith.finetune.generate import load_generator

    cold = load_generator(tiny_run_dir, dtype=torch.float32, prefix_cache_mib=0)
    assert tiny_gen._batcher is not None and cold._batcher is not None
    p = GenerationParams(max_new_tokens=15, temperature=0)
    turn1: list[dict[str, str]] = [{"role": "user", "content": "hello there, how are you?"}]
    first = tiny_gen.generate(turn1, p)
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    reused = tiny_gen._batcher.prefixes.reused
    second = tiny_gen.generate(turn2, p)
    assert tiny_gen._batcher.prefixes.reused - reused >= first.prompt_tokens
    assert second.text == cold.generate(turn2, p).text
    assert cold._batcher.prefixes.reused == 0 and len(cold._batcher.prefixes) == 0
    tiny_gen.clear_prefix_cache()
    assert len(tiny_gen._batcher.prefixes) == 0


def test_longest_common_prefix_supersede_and_budget() -> None:
    cache = PrefixCache(budget_mib=1)
    assert cache.longest([1, 2, 3]) == (0, None)
    cache.add([1, 2, 3, 4], _kv(4))
    n, kv = cache.longest([1, 2, 3, 4])
    assert n == 3 and kv is not None  # never the last token: its logits are needed
    assert cache.longest([1, 2, 9, 9])[0] == 2 and cache.longest([7, 1, 2])[0] == 0
    cache.add([1, 2], _kv(2))  # a prefix of an entry: already held
    assert len(cache) == 1
    cache.add([1, 2, 3, 4, 5, 6], _kv(6))  # supersedes [1, 2, 3, 4]
    assert len(cache) == 1 and cache.longest([1, 2, 3, 4, 5, 6, 7])[0] == 6
    big = 1_000  # tokens: 2 layers x (k, v) x 3 heads x 4 dims x 4 bytes = 192 B a token -> ~190 KB an entry
    for i in range(10):
        cache.add([100 + i] * big, _kv(big))
    assert cache.nbytes <= 1 << 20 and len(cache) == 5
    assert cache.longest([109] * 5)[0] == 4 and cache.longest([100] * 5)[0] == 0  # the oldest went first
    cache.add([5] * 10_000, _kv(10_000))  # over the whole budget: not kept, nothing evicted for it
    assert len(cache) == 5 and cache.longest([5, 5])[0] == 0
    off = PrefixCache(budget_mib=0)
    off.add([1, 2, 3], _kv(3))
    assert len(off) == 0 and off.longest([1, 2, 3]) == (0, None)


@pytest.mark.parametrize("budget", [0, 256])
def test_concurrent_chats_with_one_system_prompt(tiny_run_dir: Any, budget: int) -> None:
    """Sixteen chats that share a system prompt, with and without the cache: the answers of `generate` one by one."""
    from tunesmith.finetune.generate import load_generator

    gen = load_generator(tiny_run_dir, dtype=torch.float32, prefix_cache_mib=budget)
    eager = load_generator(tiny_run_dir, dtype=torch.float32, continuous_batching=False)
    assert gen._batcher is not None
    system = {"role": "system", "content": "You are a terse assistant for the billing team of a small company."}
    prompts: list[Any] = [[system, {"role": "user", "content": f"question {i}: what is {i} + {i}?"}]
                          for i in range(16)]
    p = GenerationParams(max_new_tokens=8, temperature=0)
    # one chat first: the other 15 then find the system prompt cached, however they are grouped when they arrive
    got = [gen.generate(prompts[0], p).text] + [c.text for c in gen.batch(prompts[1:], p)]
    assert got == [eager.generate(q, p).text for q in prompts]
    assert (gen._batcher.prefixes.reused > 0) == bool(budget)
