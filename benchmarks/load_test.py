"""Load test of the serving layer: many concurrent clients against the OpenAI API and the Gradio app on 127.0.0.1.

    python benchmarks/load_test.py                          # tiny random model: API 16 clients x 10, UI 4 x 3
    python benchmarks/load_test.py --clients 32 --requests 5 --ui-clients 0
    python benchmarks/load_test.py --model embedded          # SmolLM2-135M-Instruct, the real thing (slower)

Every prompt is unique to its client and request, decoding is greedy, so each reply is known in advance: a
sequential reference run (`Generator.generate`, one prompt at a time) gives the text and prompt token count that
each reply must carry. A reply that is missing, late past `--timeout`, or equal to another client's answer counts
as a failure. API clients alternate streamed and whole completions (whole ones are batched on the server). Last,
one streamed request is dropped mid-stream and the server's generate thread must end. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    target: str
    clients: int
    requests: int
    latencies: list[float] = field(default_factory=list)
    """Seconds per answered request (whole reply received)."""
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a latency that really happened)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def prompts(clients: int, requests: int, tag: str) -> list[list[str]]:
    return [[f"{tag} client {c} request {r}: say something about item {c * 100 + r}" for r in range(requests)]
            for c in range(clients)]


def reference(pool, model: str, all_prompts: list[str], max_tokens: int) -> dict[str, tuple[str, int]]:
    """prompt -> (greedy reply, prompt tokens), one prompt at a time: what every server reply must equal."""
    from tunesmith.finetune import GenerationParams

    gen, choice = pool.get(model)
    params = choice.params(GenerationParams(max_new_tokens=max_tokens, temperature=0))
    out = {}
    for p in all_prompts:
        c = gen.generate([{"role": "user", "content": p}], params)
        out[p] = (c.text, c.prompt_tokens)
    return out


def _api_request(http, url: str, model: str, prompt: str, max_tokens: int, stream: bool) -> tuple[str, int]:
    """One chat completion over raw HTTP; (text, usage.prompt_tokens). Checks every chunk carries one id."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    if not stream:
        r = http.post(f"{url}/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"]
    text, usage, ids = "", None, set()
    with http.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            ids.add(chunk["id"])
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
    if len(ids) != 1 or usage is None:
        raise RuntimeError(f"stream had ids {ids} and usage {usage}")
    return text, usage["prompt_tokens"]


def _run_clients(target: str, work: list[list[str]], ask, ref: dict[str, tuple[str, int]], timeout: float) -> Result:
    """Each client (a thread) sends its prompts one after another; all clients at once."""
    res = Result(target, len(work), len(work[0]) if work else 0)
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def client(c: int, mine: list[str]) -> None:
        for r, p in enumerate(mine):
            if time.monotonic() > deadline:
                with lock:
                    res.failures.append(f"{target} client {c}: deadline passed before request {r}")
                return
            t0 = time.monotonic()
            try:
                text, prompt_tokens = ask(c, r, p)
            except Exception as e:  # counted, not raised: the table shows every failure
                with lock:
                    res.failures.append(f"{target} client {c} request {r}: {type(e).__name__}: {e}"[:300])
                continue
            took = time.monotonic() - t0
            want_text, want_tokens = ref[p]
            with lock:
                if text != want_text or (prompt_tokens is not None and prompt_tokens != want_tokens):
                    res.failures.append(f"{target} client {c} request {r}: reply {text!r} ({prompt_tokens} prompt "
                                        f"tokens) is not the reply to its own prompt {want_text!r} ({want_tokens})")
                else:
                    res.latencies.append(took)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max(1, len(work))) as ex:
        list(ex.map(client, range(len(work)), work))
    res.wall_s = time.monotonic() - t0
    return res


def api_load(url: str, model: str, work: list[list[str]], ref: dict[str, tuple[str, int]], max_tokens: int,
             timeout: float = 300) -> Result:
    import httpx

    https = [httpx.Client(timeout=timeout) for _ in work]  # one connection pool per client, as separate users
    try:
        return _run_clients("API", work, lambda c, r, p: _api_request(https[c], url, model, p, max_tokens,
                                                                     stream=(c + r) % 2 == 0), ref, timeout)
    finally:
        for h in https:
            h.close()


def ui_load(url: str, model: str, work: list[list[str]], ref: dict[str, tuple[str, int]], max_tokens: int,
            timeout: float = 300) -> Result:
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in work]  # each its own Gradio session

    def ask(c: int, r: int, p: str) -> tuple[str, None]:
        job = clients[c].submit(p, model, "", None, max_tokens, 0.0, 1.0, 1.0, None, api_name="/chat")
        return job.result(timeout=timeout), None  # the chat API returns text only: no token counts to compare

    return _run_clients("UI", work, ask, ref, timeout)


def generate_threads() -> int:
    return sum(t.name == "tunesmith-generate" and t.is_alive() for t in threading.enumerate())


def disconnect_frees_generation(url: str, model: str, wait_s: float = 15) -> tuple[bool, float]:
    """Drop a long stream after 3 pieces of text; (did the server's generate thread end, seconds it took)."""
    import httpx

    before = generate_threads()
    body = {"model": model, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 900,
            "temperature": 1.0, "seed": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                seen += 1
            if seen >= 3:
                break  # closes the connection mid-stream
    t0 = time.monotonic()
    while generate_threads() > before and time.monotonic() - t0 < wait_s:
        time.sleep(0.02)
    return generate_threads() <= before, time.monotonic() - t0


def table(results: list[Result]) -> str:
    head = f"{'target':<6} | {'clients x requests':>18} | {'answered':>9} | {'failed':>6} | {'p50 ms':>8} | " \
           f"{'p90 ms':>8} | {'p99 ms':>8} | {'req/s':>6}"
    rows = [head, "-+-".join("-" * len(c) for c in head.split(" | "))]
    for r in results:
        n = r.clients * r.requests
        rows.append(f"{r.target:<6} | {f'{r.clients} x {r.requests}':>18} | {f'{r.answered}/{n}':>9} | "
                    f"{len(r.failures):>6} | {percentile(r.latencies, 50) * 1e3:>8.0f} | "
                    f"{percentile(r.latencies, 90) * 1e3:>8.0f} | {percentile(r.latencies, 99) * 1e3:>8.0f} | "
                    f"{r.answered / r.wall_s if r.wall_s else 0:>6.1f}")
    return "\n".join(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="`tiny` (random, built in a temp folder) or `embedded`")
    ap.add_argument("--clients", type=int, default=16, help="concurrent API clients")
    ap.add_argument("--requests", type=int, default=10, help="requests per API client, one after another")
    ap.add_argument("--ui-clients", type=int, default=4, help="concurrent Gradio clients (0: skip the UI)")
    ap.add_argument("--ui-requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4, help="server side: generations at once")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for each target's whole run")
    a = ap.parse_args()

    import uvicorn

    from tunesmith.ui.app import build_app, launch
    from tunesmith.ui.pool import ModelPool
    from tunesmith.ui.server import build_api

    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-load-"))
    if a.model == "tiny":
        from tunesmith.finetune.tiny import build_tiny_model, build_tiny_run

        run = build_tiny_run(tmp / "runs" / "tiny-run", build_tiny_model(tmp / "model"))
        pool = ModelPool(run.parent, default=str(run))
    else:
        pool = ModelPool(tmp / "runs", default=a.model)
    model = pool.default
    pool.get(model)

    api_work = prompts(a.clients, a.requests, "api")
    ui_work = prompts(a.ui_clients, a.ui_requests, "ui")
    print(f"model {model}: sequential reference for {sum(map(len, api_work + ui_work))} prompts ...", flush=True)
    ref = reference(pool, model, [p for w in api_work + ui_work for p in w], a.max_tokens)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_api(pool, concurrency=a.concurrency), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"

    results = [api_load(url, model, api_work, ref, a.max_tokens, a.timeout)]
    if a.ui_clients > 0:
        ui = launch(build_app(pool, concurrency=a.concurrency), host="127.0.0.1", port=_free_port(),
                    concurrency=a.concurrency, block=False)
        try:
            results.append(ui_load(ui.local_url, model, ui_work, ref, a.max_tokens, a.timeout))
        finally:
            ui.close()
    freed, took = disconnect_frees_generation(url, model)
    server.should_exit = True

    print(f"\nmax_tokens={a.max_tokens}, greedy, server concurrency={a.concurrency}, model {model}\n")
    print(table(results))
    print(f"\nclient dropped mid-stream: generate thread {'ended' if freed else 'STILL RUNNING'} after {took:.2f} s")
    failures = [f for r in results for f in r.failures]
    for f in failures[:20]:
        print("FAIL", f)
    return 0 if not failures and freed else 1


if __name__ == "__main__":
    raise SystemExit(main())
