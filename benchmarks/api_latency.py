"""Whole (non-streamed) vs streamed replies of the OpenAI API, on an idle machine and beside busy processes.

    python benchmarks/api_latency.py                         # embedded model, 24 tokens, 5 rounds per condition
    python benchmarks/api_latency.py --tiny                  # CI smoke: tiny random model, 1 round, idle and busy

Servers share machines. The same request (greedy, `--tokens` new tokens) is sent alternately streamed and whole to
`tunesmith serve` in its own process, first on an idle machine, then beside `busy` processes (pure-Python loops,
one core each) and beside a `parallel` job (a torch process doing matrix products on every core, as a training run
does). The table gives the median seconds of each and their ratio, measured side by side in one run; both paths
should cost the same, loaded or not. CPU seconds are the server process's own (user + system), from /proc.

Two servers are compared by default: `tunesmith` (as `tunesmith serve` starts: OpenMP threads wait passively) and
`spin` (libgomp's default wait: threads spin ~300k times at every barrier before they sleep; what tunesmith did
before); `spin30k` and `spin3k` are shorter spins, for `--servers`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BUSY = "while True: pass"
PARALLEL = "import torch\nx = torch.randn(1024, 1024)\nwhile True:\n    x = torch.tanh(x @ x)\n"
SMALL = "import torch\nx = torch.randn(64, 512)\nw = torch.randn(512, 512) / 23\nwhile True:\n    x = torch.tanh(x @ w)\n"
"""Another model's decode loop: many small parallel ops, so its own OpenMP threads wait at barriers all the time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVERS = {"tunesmith": {}, "spin": {"GOMP_SPINCOUNT": "300000"}, "spin30k": {"GOMP_SPINCOUNT": "30000"},
           "spin3k": {"GOMP_SPINCOUNT": "3000"}}
"""Extra environment of each server: libgomp's default spin count set explicitly keeps the CLI's passive default off."""


def _start_server(model: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    runs = tempfile.mkdtemp(prefix="tunesmith-bench-runs-")
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", model, "--runs-dir", runs,
                             "--port", str(port)], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


def _request(url: str, stream: bool, tokens: int) -> float:
    body = {"messages": [{"role": "user", "content": "Which Python module reads and writes JSON?"}],
            "max_tokens": tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    if stream:
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    break
    else:
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        json.loads(r.text)
    return time.perf_counter() - t0


def _measure(url: str, pid: int, cond: str, rounds: int, tokens: int) -> tuple[float, ...]:
    load = {"idle": [], "busy": [BUSY, BUSY], "parallel": [PARALLEL], "small": [SMALL],
            "heavy": [PARALLEL, SMALL, BUSY]}[cond]
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for code in load]
    try:
        time.sleep(2 if load else 0)  # let the load start
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for stream in (False, True):
                c0 = _server_cpu(pid)
                times[stream].append(_request(url, stream, tokens))
                cpu[stream].append(_server_cpu(pid) - c0)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    whole, streamed = statistics.median(times[False]), statistics.median(times[True])
    return (whole, streamed, whole / streamed, statistics.median(cpu[False]), statistics.median(cpu[True]),
            max(times[False]), max(times[True]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="`embedded`, `tiny` (random, for CI) or a run/model folder")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5, help="pairs (whole, streamed) per condition")
    ap.add_argument("--conditions", default="idle,busy,parallel,small,heavy",
                    help="idle; busy: 2 Python loops; parallel: torch matmuls; small: torch small ops (a decode "
                         "loop); heavy: all three kinds at once, 5 threads wanting the 2 cores")
    ap.add_argument("--servers", default="tunesmith,spin", help=f"of {', '.join(SERVERS)}")
    ap.add_argument("--tiny", action="store_true", help="smoke run: --model tiny --rounds 1 --conditions idle,busy")
    a = ap.parse_args()
    if a.tiny:
        a.model, a.rounds, a.conditions = "tiny", 1, "idle,busy"
    model = a.model
    if model == "tiny":
        from tunesmith.finetune.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="tunesmith-bench-")) / "model"))
    rows = []
    for name in a.servers.split(","):
        port = _free_port()
        server = _start_server(model, port, SERVERS[name])
        url = f"http://127.0.0.1:{port}/v1"
        try:
            _request(url, False, a.tokens), _request(url, True, a.tokens)  # warm up both paths
            for cond in a.conditions.split(","):
                rows.append((name, cond, *_measure(url, server.pid, cond, a.rounds, a.tokens)))
                print(f"{name} {cond}: whole {rows[-1][2]:.2f} s, streamed {rows[-1][3]:.2f} s", flush=True)
        finally:
            server.kill()
            server.wait()
    print(f"\nmodel {a.model}, {a.tokens} new tokens, greedy, {a.rounds} alternated pairs per condition, "
          f"{os.cpu_count()} CPUs")
    print("| server | condition | whole (median s) | streamed (median s) | whole / streamed | server CPU s whole | "
          "server CPU s streamed | worst whole | worst streamed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cond, w, s_, ratio, cw, cs, ww, ws in rows:
        print(f"| {name} | {cond} | {w:.2f} | {s_:.2f} | {ratio:.2f}x | {cw:.1f} | {cs:.1f} | {ww:.2f} | {ws:.2f} |")


if __name__ == "__main__":
    main()
