"""GGUF export per quant: file size, transformers top-1 agreement, and llama.cpp decode speed raw vs through tunesmith.

    python benchmarks/gguf_bench.py runs/quickstart          # the quickstart run (train it first)
    python benchmarks/gguf_bench.py --tiny                   # seconds, tiny random run (CI smoke run)

For each quant the run is exported (reused when RUN/gguf/NAME-QUANT.gguf exists), then the same greedy request
(the same prompt ids, `--tokens` new tokens, EOS ignored so every row decodes the same count) goes
(a) raw: xllamacpp's `Server.handle_completions`, one non-streamed call, and (b) tunesmith: `LlamaCppGenerator.
generate`, which streams through a Python callback and counts with the run's tokenizer. Decode tokens/s is the
median over `--rounds` of llama.cpp's own `timings.predicted_per_second`; the ratios compare tokens per wall second
of the whole call (prompt included), raw vs tunesmith: one plain call vs `generate`, and a streamed call with a
no-op callback vs what `stream` runs (a callback per token that also checks for cancellation). Needs xllamacpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def _row(run: Path, quant: str, tokens: int, rounds: int) -> dict:
    from tunesmith.finetune import GenerationParams, export_gguf
    from tunesmith.finetune.llamacpp import load_llamacpp

    path = run / "gguf" / f"{run.name}-{quant}.gguf"
    agreement = "reused"
    if not path.exists():
        agreement = f"{export_gguf(run, quant, out=path, llamacpp_check=False).agreement:.0%}"
    gen = load_llamacpp(run, quant=quant)
    ids = gen.tokenizer(gen.render(PROMPT), add_special_tokens=False)["input_ids"]
    req = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    decode, raw, ours, raw_s, ours_s = [], [], [], [], []
    p = GenerationParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    fixed = {"ignore_eos": True, "cache_prompt": False}
    for _ in range(rounds):
        t = time.perf_counter()
        r = gen._server.handle_completions(req)
        raw.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t))
        decode.append(r["timings"]["predicted_per_second"])
        t = time.perf_counter()
        c = gen._run(PROMPT, p, None, extra=fixed)
        ours.append(c.completion_tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        gen._server.handle_completions({**req, "stream": True}, lambda _c: False)
        raw_s.append(tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        c = gen._run(PROMPT, p, threading.Event(), lambda _t: None, extra=fixed)  # what stream() runs
        ours_s.append(c.completion_tokens / (time.perf_counter() - t))
    med = statistics.median
    return {"quant": quant, "MB": path.stat().st_size / 1e6, "agree": agreement, "decode": med(decode),
            "raw": med(raw), "ours": med(ours), "raw_s": med(raw_s), "ours_s": med(ours_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/quickstart")
    ap.add_argument("--tiny", action="store_true", help="a tiny random run in a temporary folder")
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.tiny:
        from tunesmith.finetune.tiny import build_tiny_model, build_tiny_run

        tmp = Path(tempfile.mkdtemp())
        run = build_tiny_run(tmp / "tiny-run", build_tiny_model(tmp / "base"))
        a.tokens, a.rounds = 32, 1
    else:
        run = Path(a.run)
    rows = [_row(run.resolve(), q, a.tokens, a.rounds) for q in a.quants.split(",")]
    print(f"{run.name}: {a.tokens} new tokens, greedy, median of {a.rounds}")
    print(f"{'quant':6} | {'size MB':>8} | {'top-1 vs merged':>15} | {'decode tok/s':>12} | {'generate: raw':>13} | "
          f"{'tunesmith':>9} | ratio | {'stream: raw':>11} | {'tunesmith':>9} | ratio")
    print("-+-".join("-" * w for w in (6, 8, 15, 12, 13, 9, 5, 11, 9, 5)))
    for r in rows:
        print(f"{r['quant']:6} | {r['MB']:8.1f} | {r['agree']:>15} | {r['decode']:12.1f} | {r['raw']:13.1f} | "
              f"{r['ours']:9.1f} | {r['ours'] / r['raw']:5.2f} | {r['raw_s']:11.1f} | {r['ours_s']:9.1f} | "
              f"{r['ours_s'] / r['raw_s']:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
