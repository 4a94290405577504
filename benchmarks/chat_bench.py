"""Generation speed: tunesmith's `Generator` vs plain transformers on the same model object, greedy, same limits.

    python benchmarks/chat_bench.py            # embedded SmolLM2-135M-Instruct (bf16 on a CPU with fast bf16)
    python benchmarks/chat_bench.py --tiny     # seconds, tiny random model (CI smoke run)

Single stream: time to first visible text (TTFT) and decode tokens/s, tunesmith `Generator.stream` vs
`model.generate` + `TextIteratorStreamer` in a thread (what the transformers docs show). Batched: total generated
tokens/s over the same prompts, tunesmith `Generator.batch` vs `pipeline("text-generation", batch_size=N)` and a
loop of single `generate` calls. Both sides use the very same model and tokenizer (so only the wrapper differs),
and generated tokens are counted the same way for both: the generated text re-tokenized.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Explain how Python's `json` module encodes and decodes data, with an example.",
    "Write a short story about a robot who learns to paint.",
    "What are the differences between a list and a tuple in Python? Give examples.",
    "Describe the water cycle step by step.",
    "How does `collections.Counter` work? Show three ways to use it.",
    "Give me a recipe for a simple tomato soup.",
    "Explain what a hash table is and why lookups are fast.",
    "Write a polite email asking a colleague to review my code.",
]


def _count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _msgs(p: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": p}]


def bench_stream_tunesmith(gen, params, prompt) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, text = None, ""
    for ch in gen.stream(_msgs(prompt), params):
        if ch.text and first is None:
            first = time.perf_counter()
        text += ch.text
    end = time.perf_counter()
    return (first or end) - t0, end - (first or end), _count(gen.tokenizer, text)


def bench_stream_transformers(model, tok, prompt, max_new) -> tuple[float, float, int]:
    from transformers import TextIteratorStreamer

    t0 = time.perf_counter()
    text_in = tok.apply_chat_template(_msgs(prompt), tokenize=False, add_generation_prompt=True)
    enc = tok(text_in, return_tensors="pt", add_special_tokens=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(**enc, streamer=streamer, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    th = threading.Thread(target=model.generate, kwargs=kw)
    th.start()
    first, text = None, ""
    for piece in streamer:
        if piece and first is None:
            first = time.perf_counter()
        text += piece
    th.join()
    end = time.perf_counter()
    return (first or end) - t0, end - (first or end), _count(tok, text)


def _stream_row(name, runs) -> dict:
    ttft = statistics.median(r[0] for r in runs)
    tokens = sum(r[2] for r in runs)
    decode = sum(r[1] for r in runs)
    # decode rate: tokens after the first visible one over the time after it
    return {"name": name, "ttft_ms": ttft * 1000, "tok_s": (tokens - len(runs)) / max(decode, 1e-9), "tokens": tokens}


def bench_batch_tunesmith(gen, params, prompts, bs) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = gen.batch([_msgs(p) for p in prompts], params, max_batch_size=bs)
    return time.perf_counter() - t0, sum(_count(gen.tokenizer, o.text) for o in outs)


def bench_pipeline(model, tok, prompts, max_new, bs) -> tuple[float, int]:
    from transformers import pipeline

    tok.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    t0 = time.perf_counter()
    outs = pipe([_msgs(p) for p in prompts], batch_size=bs, max_new_tokens=max_new, do_sample=False,
                pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    return dt, sum(_count(tok, o[0]["generated_text"][-1]["content"]) for o in outs)


def bench_sequential(model, tok, prompts, max_new) -> tuple[float, int]:
    import torch

    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        text_in = tok.apply_chat_template(_msgs(p), tokenize=False, add_generation_prompt=True)
        enc = tok(text_in, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        n += _count(tok, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return time.perf_counter() - t0, n


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join([fmt[0], "-+-".join("-" * w for w in widths), *fmt[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, few tokens: a smoke run in seconds")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the batched test (and single-stream runs)")
    ap.add_argument("--stream-prompts", type=int, default=3, help="prompts timed one at a time for TTFT")
    ap.add_argument("--repeats", type=int, default=2, help="each measurement repeated, the fastest kept")
    a = ap.parse_args()

    import torch

    from tunesmith.finetune import GenerationParams, load_generator

    with tempfile.TemporaryDirectory(prefix="chat_bench-") as d:
        if a.tiny:
            from tunesmith.finetune.tiny import build_tiny_model

            source = str(build_tiny_model(Path(d) / "tiny"))
            a.max_new_tokens, a.prompts, a.stream_prompts, a.repeats = 8, 4, 1, 1
        else:
            source = "embedded"
        gen = load_generator(source)
        model, tok = gen.model, gen.tokenizer
        params = GenerationParams(max_new_tokens=a.max_new_tokens, temperature=0)
        prompts = PROMPTS[: a.prompts]
        # warm up both paths once (first call pays one-off allocation and kernel selection)
        bench_stream_tunesmith(gen, params, prompts[0])
        bench_stream_transformers(model, tok, prompts[0], a.max_new_tokens)
        gen.batch([_msgs(p) for p in prompts], GenerationParams(max_new_tokens=2, temperature=0))

        def best_stream(fn) -> list:
            runs = [[fn(p) for p in prompts[: a.stream_prompts]] for _ in range(a.repeats)]
            return min(runs, key=lambda rs: sum(r[0] + r[1] for r in rs))

        ts = _stream_row("tunesmith Generator.stream", best_stream(lambda p: bench_stream_tunesmith(gen, params, p)))
        hf = _stream_row("transformers generate + TextIteratorStreamer",
                         best_stream(lambda p: bench_stream_transformers(model, tok, p, a.max_new_tokens)))
        bs = len(prompts)

        def best(fn) -> tuple[float, int]:
            return min((fn() for _ in range(a.repeats)), key=lambda r: r[0])

        batch = {
            f"tunesmith Generator.batch (batch {bs})": best(lambda: bench_batch_tunesmith(gen, params, prompts, bs)),
            f"transformers pipeline (batch_size {bs})": best(lambda: bench_pipeline(model, tok, prompts,
                                                                                   a.max_new_tokens, bs)),
            "transformers generate, one prompt at a time": best(lambda: bench_sequential(model, tok, prompts,
                                                                                       a.max_new_tokens)),
        }

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"Generation, {'tiny random model' if a.tiny else 'SmolLM2-135M-Instruct (embedded)'}, {dtype}, greedy, "
          f"max_new_tokens={a.max_new_tokens}, {torch.get_num_threads()} threads, best of {a.repeats}")
    print(f"\nSingle stream (median TTFT over {a.stream_prompts} prompts; decode tok/s after the first text)")
    rows = []
    for r in (ts, hf):
        rows.append([r["name"], f"{r['ttft_ms']:.0f}", f"{hf['ttft_ms'] / r['ttft_ms']:.2f}x", f"{r['tok_s']:.1f}",
                     f"{r['tok_s'] / hf['tok_s']:.2f}x", str(r["tokens"])])
    print(_table(["path", "TTFT ms", "speed vs HF", "decode tok/s", "vs HF", "tokens"], rows))
    print(f"\nBatched: {bs} prompts")
    ref = batch[f"transformers pipeline (batch_size {bs})"]
    rows = [[name, f"{dt:.2f}", str(n), f"{n / dt:.1f}", f"{(n / dt) / (ref[1] / ref[0]):.2f}x"]
            for name, (dt, n) in batch.items()]
    print(_table(["path", "seconds", "tokens", "tok/s", "vs pipeline"], rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
