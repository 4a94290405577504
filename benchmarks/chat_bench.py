"""Chat decoding speed, one run, same prompts, greedy, same max_new_tokens: tunesmith vs transformers vs llama.cpp.

    python benchmarks/chat_bench.py                        # embedded SmolLM2-135M-Instruct, every engine
    python benchmarks/chat_bench.py --only llama.cpp       # rerun one engine (comma list: ENGINES below)
    python benchmarks/chat_bench.py --tiny                 # seconds, tiny random model (CI smoke run)
    python benchmarks/chat_bench.py --run runs/quickstart  # a fine-tuned run: its LoRA adapter live
    python benchmarks/chat_bench.py --shape llama-3.2-1b --only tunesmith,transformers   # on a GPU (gpu.sh)

Engines (`--only` names): `tunesmith` (`Generator.stream`, exact weights; batched: that many concurrent streams,
on threads, rows of its continuous batch), `tunesmith-int8` (the same
with `decode_weights="int8"`, a second load: int8 swaps the model's linear layers in place), `tunesmith-compiled`
(`decode_weights="auto"`, int8 on a CPU and exact on a GPU, and `compile_decode=True`: streams decode through a
compiled step; its load time, compile included, is printed), `transformers` (the
baseline: a plain `from_pretrained` model, `generate` + `TextIteratorStreamer` in a thread, and `pipeline(...,
batch_size=N)`), `llama.cpp` (raw xllamacpp on the embedded Q4_1 GGUF of the same model; with `--tiny`, the tiny model
exported to f16: one slot for the single stream, N slots for the N concurrent requests). One model is in memory at a
time. Single stream: median time to first visible text (TTFT) over `--stream-prompts` prompts, and decode tokens/s
after that first text. Batched: `--concurrency` prompts at once, total generated tokens / wall seconds, and that
over the engine's single-stream decode rate (issue 15's target: >= 4x). Every engine's tokens are counted the
same way, the generated text re-tokenized with the model's tokenizer.

With `--run RUN` the tunesmith engines load the run (`load_generator(RUN)`: the adapter live, as `tunesmith chat`
serves it) and the transformers baseline loads the same base with the run's adapter through peft
(`PeftModel.from_pretrained`, unmerged, as a transformers user serves an adapter); llama.cpp still runs the base
GGUF (no adapter), so its row is a reference for speed only.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROMPTS = [
    "Explain how Python's `json` module encodes and decodes data, with an example.",
    "Write a short story about a robot who learns to paint.",
    "What are the differences between a list and a tuple in Python? Give examples.",
    "Describe the water cycle step by step.",
    "How does `collections.Counter` work? Show three ways to use it.",
    "Give me a recipe for a simple tomato soup.",
    "Explain what a hash table is and why lookups are fast.",
    "Write a polite email asking a colleague to review my code.",
    "Summarize the causes of the French Revolution in a few sentences.",
    "Write a haiku about autumn leaves, then explain its imagery.",
    "What is the difference between TCP and UDP? When would you use each?",
    "Plan a three-day trip to Rome for someone who loves history and food.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Write a SQL query that finds the five customers with the most orders.",
    "List five tips for staying focused while working from home.",
]
ENGINES = ("tunesmith", "tunesmith-int8", "tunesmith-compiled", "transformers", "llama.cpp")

Stream = Callable[[list[dict[str, str]], int, bool], tuple[float, float, str]]
"""(messages, max_new_tokens, warm) -> (seconds to the first text, seconds after it, generated text). warm: the
engine may reuse what earlier calls computed (a chat's next turn); else the prompt is computed cold."""
Batch = Callable[[list[str], int], tuple[float, list[str]]]
"""(prompts, max_new_tokens) -> (wall seconds, generated texts): all prompts at once."""


def _msgs(p: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": p}]


def _timed_stream(start: Callable[[Callable[[str], None]], None]) -> tuple[float, float, str]:
    """Run `start(emit)`, which calls `emit(text)` per new piece, and time the first non-empty piece."""
    t0, first, parts = time.perf_counter(), None, []

    def emit(text: str) -> None:
        nonlocal first
        if text and first is None:
            first = time.perf_counter()
        parts.append(text)

    start(emit)
    end = time.perf_counter()
    return (first or end) - t0, end - (first or end), "".join(parts)


def _concurrently(n: int, work: Callable[[int], None]) -> float:
    """Seconds for `work(0)` .. `work(n - 1)`, each on a thread of its own, all started at once."""
    t0 = time.perf_counter()
    ths = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return time.perf_counter() - t0


def _tunesmith(source: str, weights: str, compiled: bool = False, notes: list[str] | None = None,
               continuous: bool = True, prefix_cache: bool = True) -> tuple[Stream, Batch]:
    from tunesmith import PREFIX_CACHE_MIB
    from tunesmith.finetune import GenerationParams, load_generator

    t0 = time.perf_counter()
    gen = load_generator(source, decode_weights=weights, compile_decode=compiled, continuous_batching=continuous,
                         prefix_cache_mib=PREFIX_CACHE_MIB if prefix_cache else 0)
    if compiled and notes is not None:
        notes.append(f"tunesmith-compiled: load + compile {time.perf_counter() - t0:.1f} s"
                     + ("" if gen.compiled_decode else f"; NOT compiled: {gen.why_no_compile}"))

    def params(n: int) -> Any:
        return GenerationParams(max_new_tokens=n, temperature=0)

    def stream(msgs: list[dict[str, str]], n: int, warm: bool) -> tuple[float, float, str]:
        if not warm:
            gen.clear_prefix_cache()  # cold, as llama.cpp's calls here (cache_prompt false)

        def start(emit: Callable[[str], None]) -> None:
            for chunk in gen.stream(msgs, params(n)):
                emit(chunk.text)

        return _timed_stream(start)

    def batch(ps: list[str], n: int) -> tuple[float, list[str]]:
        """Concurrent streamed requests, each on its own thread, as API clients and chat users send them: they
        decode as rows of one continuous batch (finetune/continuous.py)."""
        out = [""] * len(ps)
        gen.clear_prefix_cache()  # cold: only what the concurrent prompts share (the system prompt) is reused

        def work(i: int) -> None:
            out[i] = "".join(c.text for c in gen.stream(_msgs(ps[i]), params(n)))

        return _concurrently(len(ps), work), out

    return stream, batch


def _transformers(source: str, tok: Any, dtype: Any, device: str, run: str | None = None) -> tuple[Stream, Batch]:
    from transformers import AutoModelForCausalLM, TextIteratorStreamer, pipeline

    from tunesmith.finetune import resolve_base_model

    model = AutoModelForCausalLM.from_pretrained(  # use_kernels=False: the Hub kernels transformers would fetch on a GPU
        resolve_base_model(source), dtype=dtype, device_map=device, use_kernels=False).eval()
    if run:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(run) / "adapter")).eval()

    def stream(msgs: list[dict[str, str]], n: int, warm: bool) -> tuple[float, float, str]:
        def start(emit: Callable[[str], None]) -> None:  # `warm` or not: generate computes every prompt
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            kw = dict(**enc, streamer=streamer, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            th = threading.Thread(target=model.generate, kwargs=kw)  # what the transformers docs show
            th.start()
            for piece in streamer:
                emit(piece)
            th.join()

        return _timed_stream(start)

    pipe = pipeline("text-generation", model=model, tokenizer=tok)

    def batch(ps: list[str], n: int) -> tuple[float, list[str]]:
        tok.padding_side = "left"
        t0 = time.perf_counter()
        outs = pipe([_msgs(p) for p in ps], batch_size=len(ps), max_new_tokens=n, do_sample=False,
                    pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0, [o[0]["generated_text"][-1]["content"] for o in outs]

    return stream, batch


def _parallel_server(path: Path, slots: int, per_slot: int, threads: int) -> Any:
    """xllamacpp serving `slots` sequences at once (continuous batching); finetune/llamacpp.py's `_server` has one."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path, p.n_parallel, p.n_ctx, p.verbosity, p.warmup = str(path), slots, slots * per_slot, -1, False
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
    return xlc.Server(p)


def _llamacpp(gguf: Path, tok: Any, per_slot: int, slots: int, threads: int) -> tuple[Stream, Batch]:
    """Raw xllamacpp calls (no tunesmith wrapper in the timed path): the prompt rendered and tokenized with the
    model's tokenizer exactly as for the other engines, then sent as token ids; no prompt cache between calls
    except a chat's next turn (`warm`: cache_prompt, its slot reuses the common prefix of its last prompt)."""
    from tunesmith.finetune import GenerationParams
    from tunesmith.finetune.llamacpp import LlamaCppGenerator

    one = LlamaCppGenerator(gguf, tok, gguf.name, n_ctx=per_slot, threads=threads)  # one slot, as tunesmith serves
    many = _parallel_server(gguf, slots, per_slot, threads)

    def request(msgs: list[dict[str, str]], n: int, warm: bool = False) -> dict[str, Any]:  # greedy is top_k=1
        return one._request(one.render(msgs), GenerationParams(max_new_tokens=n, temperature=0),
                            {"cache_prompt": warm})

    def stream(msgs: list[dict[str, str]], n: int, warm: bool) -> tuple[float, float, str]:
        def start(emit: Callable[[str], None]) -> None:
            def on_chunk(c: dict[str, Any]) -> bool:
                emit((c.get("choices") or [{}])[0].get("text") or "")
                return False  # False: go on

            one._server.handle_completions({**request(msgs, n, warm), "stream": True}, on_chunk)

        return _timed_stream(start)

    def batch(ps: list[str], n: int) -> tuple[float, list[str]]:
        out: list[str] = [""] * len(ps)

        def work(i: int) -> None:
            r = many.handle_completions(request(_msgs(ps[i]), n))  # releases the GIL: the calls run side by side
            if "choices" not in r:
                raise RuntimeError(f"llama.cpp failed on request {i} of {len(ps)}: {str(r)[:300]}")
            out[i] = r["choices"][0]["text"]

        return _concurrently(len(ps), work), out

    return stream, batch


def _measure(stream: Stream, batch: Batch, prompts: list[str], a: argparse.Namespace,
             count: Callable[[str], int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One engine's single-stream and batched rows, each the fastest of `a.repeats`, after a warm-up."""
    stream(_msgs(prompts[0]), a.max_new_tokens, False)  # warm-up: one-off allocations, kernel selection
    batch(prompts, 2)
    runs = min(([stream(_msgs(p), a.max_new_tokens, False) for p in prompts[: a.stream_prompts]]
                for _ in range(a.repeats)),
               key=lambda rs: sum(r[0] + r[1] for r in rs))
    tokens = [count(r[2]) for r in runs]
    secs, texts = min((batch(prompts, a.max_new_tokens) for _ in range(a.repeats)), key=lambda r: r[0])
    n = sum(count(t) for t in texts)
    # decode rate: the tokens after the first visible one over the time after it
    return ({"ttft_ms": statistics.median(r[0] for r in runs) * 1000, "tokens": sum(tokens),
             "tok_s": sum(max(t - 1, 0) for t in tokens) / max(sum(r[1] for r in runs), 1e-9)},
            {"seconds": secs, "tokens": n, "tok_s": n / secs})


def _turns(stream: Stream, a: argparse.Namespace, count: Callable[[str], int],
           render: Callable[[list[dict[str, str]]], str]) -> dict[str, Any]:
    """A chat of `a.turns` user turns (PROMPTS in order), each answer appended to the conversation: every turn's
    TTFT, its prompt tokens, and the TTFT of the last turn (the whole conversation so far, only the new turn new)."""
    msgs: list[dict[str, str]] = []
    ttfts, sizes = [], []
    for i in range(a.turns):
        msgs.append({"role": "user", "content": PROMPTS[i]})
        first, _, text = stream(msgs, a.max_new_tokens, i > 0)
        ttfts.append(first * 1000)
        sizes.append(count(render(msgs)))
        msgs.append({"role": "assistant", "content": text})
    return {"ttft_ms": ttfts, "prompt_tokens": sizes}


def _machine(threads: int, dtype: Any) -> str:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu}{gpu}, torch.get_num_threads()={torch.get_num_threads()}, llama.cpp threads={threads}, "
            f"dtype={str(dtype).replace('torch.', '')}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join([fmt[0], "-+-".join("-" * w for w in widths), *fmt[1:]])


def _ratio(x: float, ref: float | None) -> str:
    """`x / ref`, or "-" when the reference engine did not run (`--only`)."""
    return f"{x / ref:.2f}x" if ref else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, few tokens: a smoke run in seconds")
    ap.add_argument("--only", default=",".join(ENGINES), help=f"comma list of engines to run, from {ENGINES}")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--tiny: 8)")
    ap.add_argument("--concurrency", type=int, default=16, help=f"concurrent requests (prompts) in the batched test, "
                    f"up to {len(PROMPTS)}")
    ap.add_argument("--stream-prompts", type=int, default=None, help="prompts timed one at a time (default 3, tiny 1)")
    ap.add_argument("--repeats", type=int, default=None, help="each measurement repeated, the fastest kept (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch.get_num_threads())")
    ap.add_argument("--no-continuous-batching", action="store_true",
                    help="tunesmith engines without continuous batching: each request its own `generate` call "
                         "(how tunesmith served before finetune/continuous.py)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="tunesmith engines without the prefix cache (finetune/prefixes.py): concurrent prompts do not "
                         "share their system prompt's keys/values, a chat's next turn computes the whole conversation")
    ap.add_argument("--turns", type=int, default=None, help="user turns of the timed chat (default 6, tiny 2)")
    ap.add_argument("--run", help="a LoRA run folder: tunesmith and transformers decode with its adapter live")
    ap.add_argument("--shape", help="decode a random-init model of this real shape (benchmarks/shapes.py), built "
                    "first; its answers run to --max-new-tokens (random weights rarely say EOS)")
    ap.add_argument("--tokenizer", help="tokenizer folder of the --shape model (default: the embedded model's)")
    ap.add_argument("--keep-going", action="store_true",
                    help="an engine that fails becomes a note under the tables; the others still run")
    ap.add_argument("--shape-dir", help="keep the --shape model in DIR/SHAPE and reuse it there (default: a temporary "
                    "folder, deleted at the end)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a time limit's SIGTERM ends like Ctrl-C: tables kept
    only = [e.strip() for e in a.only.split(",") if e.strip()]
    if bad := [e for e in only if e not in ENGINES]:
        ap.error(f"--only {','.join(bad)}: not an engine; pick from {','.join(ENGINES)}")
    if not 1 <= a.concurrency <= len(PROMPTS):
        ap.error(f"--concurrency must be 1..{len(PROMPTS)} (the PROMPTS list), got {a.concurrency}")
    a.max_new_tokens = a.max_new_tokens or (8 if a.tiny else 64)
    a.stream_prompts = a.stream_prompts or (1 if a.tiny else 3)
    a.repeats = a.repeats or (1 if a.tiny else 2)
    a.turns = a.turns or (2 if a.tiny else 6)
    if not 1 <= a.turns <= len(PROMPTS):
        ap.error(f"--turns must be 1..{len(PROMPTS)} (the PROMPTS list), got {a.turns}")

    import torch

    from tunesmith.finetune import load_tokenizer
    from tunesmith.finetune.llamacpp import llamacpp_available
    from tunesmith.finetune.model import embedded_gguf_path, pick_dtype

    threads = a.threads or torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype("auto", device)  # what tunesmith's load_run picks; the transformers baseline loads the same
    prompts = PROMPTS[: a.concurrency]
    notes: list[str] = []
    stream_rows: dict[str, dict[str, Any]] = {}
    batch_rows: dict[str, dict[str, Any]] = {}
    turn_rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chat_bench-") as d:
        if a.shape:
            import sys

            sys.path.insert(0, str(Path(__file__).parent))
            from shapes import build_shape_model

            source = str(build_shape_model(a.shape, Path(a.shape_dir or d) / a.shape, a.tokenizer, tiny=a.tiny))
        elif a.tiny:
            from tunesmith.finetune.tiny import build_tiny_model

            source = str(build_tiny_model(Path(d) / "tiny"))
        else:
            source = "embedded"
        if a.run:
            from tunesmith.finetune import read_yaml

            source = str(read_yaml(Path(a.run) / "config.yaml")["base_model"])  # the run's base, for the baseline
        tok = load_tokenizer(source)
        ours = a.run or source  # what the tunesmith engines load

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        def render(msgs: list[dict[str, str]]) -> str:
            return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

        def gguf() -> Path:
            if not a.tiny and not a.shape:
                return embedded_gguf_path()  # the Q4_1 file the embedded model is dequantized from
            from tunesmith.finetune import export_gguf

            return Path(export_gguf(source, "f16", out=Path(d) / "model-f16.gguf", llamacpp_check=False).path)

        longest = max(count(tok.apply_chat_template(_msgs(p), tokenize=False, add_generation_prompt=True))
                      for p in prompts)
        per_slot = max(longest + a.max_new_tokens + 16, 160 * a.turns)  # the chat: ~25 + 64 + 50 tokens a turn
        gguf_name = "f16" if a.tiny or a.shape else "embedded Q4_1"
        cb, pc = not a.no_continuous_batching, not a.no_prefix_cache
        auto_weights = "int8" if device == "cpu" else "exact"  # what decode_weights="auto" picks
        engines: dict[str, tuple[str, str, str, Callable[[], tuple[Stream, Batch]]]] = {  # name: paths, skip, build
            "tunesmith": ("Generator.stream", f"{a.concurrency} streams at once", "",
                          lambda: _tunesmith(ours, "exact", continuous=cb, prefix_cache=pc)),
            "tunesmith-int8": ('stream, decode_weights="int8"', f"{a.concurrency} streams, int8", "",
                               lambda: _tunesmith(ours, "int8", continuous=cb, prefix_cache=pc)),
            "tunesmith-compiled": (f'stream, {auto_weights}, compile_decode=True',
                                   f"{a.concurrency} streams, {auto_weights}, compiled", "",
                                   lambda: _tunesmith(ours, "auto", compiled=True, notes=notes, continuous=cb,
                                                      prefix_cache=pc)),
            "transformers": ("generate + TextIteratorStreamer" + (" (peft)" if a.run else ""),
                             f"pipeline, batch_size {a.concurrency}", "",
                             lambda: _transformers(source, tok, dtype, device, a.run)),
            "llama.cpp": (f"xllamacpp, {gguf_name} GGUF, 1 slot", f"xllamacpp, {a.concurrency} slots",
                          "" if llamacpp_available() else "skipped: xllamacpp is not installed (pip install xllamacpp)",
                          lambda: _llamacpp(gguf(), tok, per_slot, a.concurrency, threads)),
        }
        cut, name = False, ""
        try:
            for name in only:
                stream_how, batch_how, skip, build = engines[name]
                if skip:
                    notes.append(f"{name}: {skip}")
                    continue
                try:
                    stream, batch = build()
                    stream_rows[name], batch_rows[name] = _measure(stream, batch, prompts, a, count)
                    stream_rows[name]["how"], batch_rows[name]["how"] = stream_how, batch_how
                    turn_rows[name] = _turns(stream, a, count, render)
                except Exception as e:  # one engine failing (a GPU run's compiled step, say) leaves the others' rows
                    if not a.keep_going:
                        raise
                    notes.append(f"{name}: FAILED: {type(e).__name__}: {str(e)[:300]}")
                    for rows in (stream_rows, batch_rows, turn_rows):
                        rows.pop(name, None)
                    continue
                gc.collect()  # one model in memory at a time: the engine's closures are gone
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a time limit (gpu.sh's sections): print what finished
            cut = True
            notes.append(f"cut short while {name} ran: the tables hold what finished before")

    model = "tiny random model" if a.tiny else "SmolLM2-135M-Instruct (embedded)"
    if a.shape:
        from shapes import describe

        model = describe(a.shape, a.tiny)
    model += f", LoRA run {a.run} (adapter live; llama.cpp: the base GGUF)" if a.run else ""
    model += ", tunesmith WITHOUT continuous batching" if a.no_continuous_batching else ""
    model += ", tunesmith WITHOUT the prefix cache" if a.no_prefix_cache else ""
    print(f"Chat decoding, {model}, greedy, max_new_tokens={a.max_new_tokens}, best of {a.repeats}")
    print(_machine(threads, dtype))
    print(f"\nSingle stream (median TTFT over {a.stream_prompts} prompts; decode tok/s after the first text)")
    ref = {k: (stream_rows.get(k) or {}).get("tok_s") for k in ("transformers", "llama.cpp")}
    rows = [[k, r["how"], f"{r['ttft_ms']:.0f}", f"{r['tok_s']:.1f}", _ratio(r["tok_s"], ref["transformers"]),
             _ratio(r["tok_s"], ref["llama.cpp"]), str(r["tokens"])] for k, r in stream_rows.items()]
    print(_table(["engine", "path", "TTFT ms", "decode tok/s", "vs HF", "vs llama.cpp", "tokens"], rows))
    print(f"\nBatched: {a.concurrency} concurrent requests (batched / single: over the engine's single-stream decode "
          "tok/s; target >= 4x)")
    bref = {k: (batch_rows.get(k) or {}).get("tok_s") for k in ("transformers", "llama.cpp")}
    rows = [[k, r["how"], f"{r['seconds']:.2f}", str(r["tokens"]), f"{r['tok_s']:.1f}",
             _ratio(r["tok_s"], stream_rows[k]["tok_s"]), _ratio(r["tok_s"], bref["transformers"]),
             _ratio(r["tok_s"], bref["llama.cpp"])] for k, r in batch_rows.items()]
    print(_table(["engine", "path", "seconds", "tokens", "tok/s", "batched / single", "vs HF", "vs llama.cpp"], rows))
    print(f"\nA chat of {a.turns} turns, each answer appended (TTFT; tunesmith: its prefix cache; llama.cpp: "
          "cache_prompt, its slot's last prompt; transformers: generate, nothing reused)")
    last = (turn_rows.get("llama.cpp") or {}).get("ttft_ms")
    rows = [[k, f"{r['ttft_ms'][0]:.0f}", f"{r['ttft_ms'][-1]:.0f}", str(r["prompt_tokens"][-1]),
             " ".join(f"{t:.0f}" for t in r["ttft_ms"]), _ratio(last[-1], r["ttft_ms"][-1]) if last else "-"]
            for k, r in turn_rows.items()]
    print(_table(["engine", "TTFT turn 1 ms", f"TTFT turn {a.turns} ms", f"prompt tokens turn {a.turns}",
                  "every turn ms", "last turn: llama.cpp ms / ms"], rows))
    for note in notes:
        print(f"note: {note}", flush=True)
    if cut:  # the engine's generator threads may still be decoding: leave without waiting for them
        os._exit(124)


if __name__ == "__main__":
    main()
