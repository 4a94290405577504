"""A long prompt arriving while answers stream: how long do the answers in flight stall, with chunked prefill
(finetune/continuous.py, `prefill_chunk`) and without it?

    python benchmarks/long_prompt.py                  # SmolLM2-135M-Instruct, compiled int8 decode (tunesmith chat's
                                                      # CPU default), 8 streams, a ~2,000-token prompt
    python benchmarks/long_prompt.py --chunks 0,256 --rounds 5
    python benchmarks/long_prompt.py --tiny           # tiny random model: a smoke run in seconds

Each round: `--streams` chat streams start (greedy, `--max-new-tokens`); once every one has its first token, one
request with a long prompt (records of the shipped Debian-sections data, cut to `--long-tokens` tokens) arrives.
Per setting: the streams' longest wait between two tokens (the stall a chat user sees), their median gap, the long
request's time to first token, and the streams' tokens per second over the round. Settings take turns round by
round in one process and each figure is a median over rounds: this VM's speed drifts by 30% within minutes.
Chunk 0 is no chunking (the whole prompt in one forward, as before chunked prefill). Last, the same rounds on
llama.cpp (the `xllamacpp` wheel, the embedded Q4_1 GGUF, one slot per request, its default batch of 2,048 tokens) for
reference, when it is installed (`--no-llamacpp` skips it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_bench import PROMPTS, _machine, _msgs, _parallel_server, _table  # benchmarks/ is on sys.path as a script

DATA = Path(__file__).parent / "data" / "debian_sections" / "train_150.jsonl"


def _long_prompt(tok: Any, tokens: int) -> list[dict[str, str]]:
    """A user message of about `tokens` prompt tokens: package descriptions, then a question about them."""
    lines = [json.loads(r)["messages"][0]["content"].split("\n\n", 1)[1] for r in DATA.read_text().splitlines()]
    question = "\n\nWhich of these packages would you install on a mail server? Name three."
    text = ""
    for line in lines * 20:
        more = text + line + "\n"
        if len(tok(more + question)["input_ids"]) > tokens:
            break
        text = more
    return [{"role": "user", "content": "Here are some Debian packages:\n" + text + question}]


Streamer = Callable[[list[dict[str, str]], int, Callable[[], None]], None]
"""(messages, max_new_tokens, on_token): streams one greedy answer, calling `on_token()` at each new token."""


def _tunesmith(gen: Any) -> Streamer:
    from tunesmith.finetune import GenerationParams

    def stream(msgs: list[dict[str, str]], n: int, on_token: Callable[[], None]) -> None:
        for chunk in gen.stream(msgs, GenerationParams(max_new_tokens=n, temperature=0)):
            if chunk.completion is None:
                on_token()

    return stream


def _llamacpp(tok: Any, slots: int, per_slot: int) -> Streamer:
    """Raw xllamacpp calls on the embedded Q4_1 GGUF: prompts rendered and tokenized as for tunesmith, greedy."""
    import torch

    from tunesmith.finetune.model import embedded_gguf_path

    server = _parallel_server(embedded_gguf_path(), slots, per_slot, torch.get_num_threads())

    def stream(msgs: list[dict[str, str]], n: int, on_token: Callable[[], None]) -> None:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        req = {"prompt": ids, "max_tokens": n, "temperature": 0, "top_k": 1, "cache_prompt": False, "stream": True}
        server.handle_completions(req, lambda c: (on_token(), False)[1])  # False: go on

    return stream


def _round(stream: Streamer, n: int, new: int, long: list[dict[str, str]]) -> dict[str, float]:
    """One round: `n` streams, the long prompt once all have started; the figures of this round."""
    times: list[list[float]] = [[] for _ in range(n)]
    started = threading.Barrier(n + 1)

    def one(i: int) -> None:
        def on_token() -> None:
            times[i].append(time.perf_counter())
            if len(times[i]) == 1:
                started.wait()

        stream(_msgs(PROMPTS[i % len(PROMPTS)]), new, on_token)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    started.wait()
    sent, first = time.perf_counter(), []
    stream(long, 4, lambda: first.append(time.perf_counter()))
    ttft = first[0] - sent
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:])]
    return {"stall": max(gaps), "gap": statistics.median(gaps), "ttft": ttft,
            "tps": sum(len(ts) for ts in times) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, few tokens: a smoke run")
    ap.add_argument("--chunks", default="0,128,256,512", help="prefill chunks (tokens) to compare; 0: no chunking")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=None, help="the long prompt's tokens (default 2000, tiny 200)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="each stream's tokens (default 64, tiny 24)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 3, tiny 1)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp reference rounds")
    a = ap.parse_args()
    chunks = [int(c) for c in a.chunks.split(",")]
    long_tokens = a.long_tokens or (200 if a.tiny else 2000)
    new = a.max_new_tokens or (24 if a.tiny else 64)
    rounds = a.rounds or (1 if a.tiny else 3)

    import torch

    from tunesmith.finetune import load_generator, load_tokenizer
    from tunesmith.finetune.continuous import PREFILL_TOKENS
    from tunesmith.finetune.llamacpp import llamacpp_available
    from tunesmith.finetune.model import pick_dtype

    with tempfile.TemporaryDirectory(prefix="long_prompt-") as d:
        if a.tiny:
            from tunesmith.finetune.tiny import build_tiny_model

            source = str(build_tiny_model(Path(d) / "tiny"))
        else:
            source = "embedded"
        tok = load_tokenizer(source)
        long = _long_prompt(tok, long_tokens)
        t0 = time.perf_counter()
        gen = load_generator(source, decode_weights="auto", compile_decode=not a.tiny)
        batcher = gen._batcher  # the batch's own knob, set between rounds (a benchmark's reach, not an API)
        assert batcher is not None, gen.why_no_batching
        ours = _tunesmith(gen)
        batcher.prefill_chunk = PREFILL_TOKENS
        _round(ours, a.streams, new, long)  # warm-up: compiled graphs, the allocator
        print(f"load + compile + warm-up round: {time.perf_counter() - t0:.1f} s")
        got: dict[str, list[dict[str, float]]] = {}
        for r in range(rounds):
            for c in chunks if r % 2 == 0 else chunks[::-1]:
                batcher.prefill_chunk = c or PREFILL_TOKENS
                gen.clear_prefix_cache()  # every round computes every prompt
                got.setdefault("off" if c == 0 else str(c), []).append(_round(ours, a.streams, new, long))
        n_long = len(tok.apply_chat_template(long, add_generation_prompt=True, tokenize=True, return_dict=True)
                     ["input_ids"])
        del gen, batcher, ours
        if not a.tiny and not a.no_llamacpp and llamacpp_available():
            theirs = _llamacpp(tok, a.streams + 1, n_long + 64)
            _round(theirs, a.streams, new, long)  # warm-up
            got["llama.cpp"] = [_round(theirs, a.streams, new, long) for _ in range(rounds)]

    def med(key: str, what: str) -> float:
        return statistics.median(x[what] for x in got[key])

    base = next(iter(got))
    rows = [[key if key != "llama.cpp" else "llama.cpp (batch 2048)", f"{med(key, 'stall') * 1e3:,.0f}",
             f"{med(key, 'gap') * 1e3:,.0f}", f"{med(key, 'ttft') * 1e3:,.0f}", f"{med(key, 'tps'):.1f}",
             f"{med(base, 'stall') / med(key, 'stall'):.2f}x"] for key in got]
    print(f"\n{_machine(torch.get_num_threads(), pick_dtype('auto', 'cpu'))}; {a.streams} streams x {new} tokens, "
          f"a {n_long:,}-token prompt arriving; median of {rounds} round(s)\n")
    print(_table(["prefill chunk", "streams' longest gap ms", "median gap ms", "long prompt TTFT ms",
                  "streams tok/s", f"stall vs {base}"], rows))


if __name__ == "__main__":
    main()
