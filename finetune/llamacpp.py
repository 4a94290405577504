"""llama.cpp through the `xllamacpp` wheel (a prebuilt llama.cpp on PyPI): the export check and a serving engine.

`check_llamacpp` is the second half of the export check: llama.cpp itself loads the GGUF, renders the probe
conversation with the chat template embedded in the file, and must answer it greedily exactly as transformers does
(f16) and stop where transformers stops. `LlamaCppGenerator` serves an exported run with the public methods the
front ends use from `Generator` (`render`, `count_tokens`, `generate`, `stream`, `batch`, ...), returning the same
`Completion` / `Chunk` objects, so `tunesmith chat|serve|ui --engine llama.cpp` changes nothing else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError, ModelLoadError, UnsupportedRequest
from .logits import GeneratedLogprob
from .params import Chunk, Completion, GenerationParams, Prompt
from .streams import thread_stream

CHECK_TOKENS = 32
"""How many tokens the llama.cpp check lets both engines write: enough for the short answer to end with EOS."""

CHECK_CONVERSATION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
"""A question a chat model answers in a few tokens and then ends its turn, so the check sees where it stops."""


def llamacpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


def _server(path: str | Path, n_ctx: int, threads: int | None = None) -> Any:
    try:
        import xllamacpp as xlc
    except ImportError as e:
        from tunesmith import MissingExtraError

        raise MissingExtraError("export", ["xllamacpp"], "llama.cpp (--engine llama.cpp)") from e
    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.use_jinja = True  # the chat template embedded in the GGUF, rendered by llama.cpp's Jinja engine
    params.verbosity = -1  # llama.cpp logs every request at INFO; tunesmith prints what matters
    params.warmup = False
    n = threads or max(1, len(os.sched_getaffinity(0)))
    params.cpuparams.n_threads = n
    params.cpuparams_batch.n_threads = n
    return xlc.Server(params)


def check_llamacpp(path: Path, model: Any, tok: Any, quant: str, system: str | None) -> dict[str, Any]:
    """llama.cpp's greedy answer to the probe conversation vs transformers' on the merged model; ExportError when
    the prompt is tokenized differently, or (f16) the answers differ, or llama.cpp writes transformers' answer and
    runs on past its EOS. A quantised file may answer other words (its weights differ): then only the prompt is
    compared, and the answers are reported."""
    msgs = ([{"role": "system", "content": system}] if system else []) + CHECK_CONVERSATION
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    srv = _server(path, n_ctx=min(int(model.config.max_position_embeddings), 2048))
    r = srv.handle_chat_completions({"messages": msgs, "max_tokens": CHECK_TOKENS, "temperature": 0, "top_k": 1})
    del srv
    if "choices" not in r:
        raise ExportError(f"llama.cpp could not answer with {path.name}: {str(r)[:300]}. Deleted.")
    choice = r["choices"][0]
    got, finish, n_prompt = choice["message"].get("content") or "", choice["finish_reason"], r["usage"]["prompt_tokens"]
    eos = {tok.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=CHECK_TOKENS, do_sample=False, temperature=None,
                             top_p=None, top_k=None, eos_token_id=sorted(i for i in eos if i is not None),
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    stopped = bool(out) and out[-1] in eos
    want = tok.decode(out, skip_special_tokens=True)
    res = {"llamacpp_answer": got, "transformers_answer": want, "finish_reason": finish, "prompt_tokens": n_prompt,
           "same_answer": _same(got, want), "stops_at_eos": stopped}
    if n_prompt != len(ids):
        raise ExportError(f"{path.name}: llama.cpp renders and tokenizes the probe conversation to {n_prompt} tokens, "
                          f"transformers to {len(ids)}: the embedded chat template or tokenizer differs. Deleted.")
    if quant == "f16" and not res["same_answer"]:
        raise ExportError(f"{path.name}: llama.cpp's greedy answer {got[:80]!r} differs from transformers' "
                          f"{want[:80]!r} on the probe conversation. Deleted.")
    ran_on = got.strip().startswith(want.rstrip("\ufffd").strip()) and len(got.strip()) > len(want.strip())
    if stopped and finish != "stop" and ran_on:  # transformers' very answer, then no EOS where it ended
        raise ExportError(f"{path.name}: transformers ends its answer with EOS but llama.cpp ran on to "
                          f"{CHECK_TOKENS} tokens ({got[:80]!r}): the EOS/EOT ids in the file are wrong. Deleted.")
    return res


def _logprobs(choice: dict[str, Any], p: GenerationParams) -> list[GeneratedLogprob]:
    """llama.cpp's `logprobs.content` entries as `GeneratedLogprob`s (what the OpenAI routes serve)."""
    out = []
    for e in (choice.get("logprobs") or {}).get("content") or []:
        top = [(t["token"], t["logprob"], bytes(t.get("bytes") or [])) for t in e.get("top_logprobs") or []]
        out.append(GeneratedLogprob(e["token"], e["logprob"], top[: p.top_logprobs], bytes(e.get("bytes") or [])))
    return out


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
"""GGUF metadata value types -> struct formats (8 is a string, 9 an array)."""


def gguf_context_length(path: str | Path) -> int:
    """`{arch}.context_length` from a GGUF's header. gguf.GGUFReader would parse every field first: 4.5 s for
    SmolLM2's 49k-token vocabulary, at every server start."""
    import struct

    def read(fmt: str) -> Any:
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return f.read(read("Q")).decode("utf-8", errors="replace")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic at its start).")
        read("I"), read("Q")  # version, tensor count
        arch = None
        for _ in range(read("Q")):
            key, vtype = string(), read("I")
            if vtype == 8:
                val: Any = string()
            elif vtype == 9:  # an array: skipped
                etype, n = read("I"), read("Q")
                for _ in range(n if etype == 8 else 0):
                    f.seek(read("Q"), 1)
                if etype != 8:
                    f.seek(n * struct.calcsize(_SCALARS[etype]), 1)
                continue
            else:
                val = read(_SCALARS[vtype])
            arch = val if key == "general.architecture" else arch
            if arch and key == f"{arch}.context_length":
                return int(val)
    raise ModelLoadError(f"{path} does not say its context length (no {arch}.context_length in its header).")


def _same(a: str, b: str) -> bool:
    """Equal answers, but for a trailing half UTF-8 character: llama.cpp holds back bytes that do not make a
    character yet, transformers decodes them to U+FFFD; and llama.cpp's chat endpoint trims the answer."""
    return a.rstrip("\ufffd").strip() == b.rstrip("\ufffd").strip()


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


class LlamaCppGenerator:
    """`Generator`'s serving surface over llama.cpp. Prompts are rendered and counted with the run's own tokenizer
    and template (the export check proved llama.cpp tokenizes them identically), then sent as text."""

    has_adapter = False
    """The adapter is merged into the GGUF: `use_adapter=False` (base-model answers) needs the transformers engine."""

    def __init__(self, gguf: str | Path, tokenizer: Any, name: str, config: dict[str, Any] | None = None,
                 n_ctx: int | None = None, threads: int | None = None) -> None:
        trained = gguf_context_length(gguf)
        self.path, self.tokenizer, self.name = Path(gguf), tokenizer, name
        self.config = config or {}
        self.n_ctx = min(n_ctx or trained, trained)
        """The context llama.cpp allocates (prompt + answer); `context_length` reads it."""
        self.model = None
        self._lock = threading.Lock()  # one llama.cpp slot: requests take turns, as n_parallel=1 serves them
        self._server = _server(self.path, self.n_ctx, threads)

    @property
    def system_prompt(self) -> str | None:
        return (self.config.get("data") or {}).get("system_prompt") or None

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.name}'s tokenizer has no chat template; pass a plain string prompt.")
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _request(self, text: str, p: GenerationParams, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if not p.use_adapter:
            raise UnsupportedRequest("use_adapter=False needs the transformers engine (--engine transformers): the llama.cpp "
                             "engine serves the merged model.")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.n_ctx:
            from .params import ContextError

            raise ContextError(f"The prompt is {len(ids)} tokens but {self.name} reads at most {self.n_ctx}. Shorten "
                               "it.", "messages")
        greedy = p.temperature == 0  # top_k=1 is greedy; top_p over the whole sorted vocabulary cost 12% speed
        req: dict[str, Any] = {
            "prompt": ids, "max_tokens": min(p.max_new_tokens, self.n_ctx - len(ids)), "temperature": p.temperature,
            "top_p": 1.0 if greedy else p.top_p, "top_k": 1 if greedy else p.top_k, "repeat_penalty": p.repetition_penalty,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty, "stop": list(p.stop),
            "cache_prompt": True,
        }
        if p.seed is not None:
            req["seed"] = p.seed
        if p.json_schema:
            req["json_schema"] = p.json_schema
        if p.logprobs:  # llama.cpp's are from the raw logits over the whole vocabulary too, before sampling
            req["n_probs"] = max(1, p.top_logprobs)
        return {**req, **(extra or {})}

    def _run(self, prompt: Prompt, p: GenerationParams, cancel: threading.Event | None, emit: Any = None,
             extra: dict[str, Any] | None = None) -> Completion:
        """One llama.cpp request. With `emit` or `cancel` it streams: `emit(text)` gets each new piece (llama.cpp
        cuts stop strings itself and holds back text that may still become one, so every piece is final) and a set
        `cancel` ends it at the next token. Without them it is one plain call: no Python callback per token.
        `extra`: request fields passed as they are (benchmarks/gguf_bench.py sets ignore_eos)."""
        req = self._request(self.render(prompt), p, extra)
        if emit is None and cancel is None:
            with self._lock:
                r = self._server.handle_completions(req)
            if "choices" not in r:
                raise RuntimeError(f"llama.cpp failed on {self.name}: {str(r)[:300]}")
            usage = r.get("usage") or {}
            return Completion(r["choices"][0]["text"], usage.get("prompt_tokens", len(req["prompt"])),
                              usage.get("completion_tokens", 0), r["choices"][0].get("finish_reason") or "stop",
                              _logprobs(r["choices"][0], p) if p.logprobs else None)
        parts: list[str] = []
        lps: list[GeneratedLogprob] = []
        final: dict[str, Any] = {}
        cancelled = False

        def on_chunk(c: dict[str, Any]) -> bool:
            nonlocal cancelled
            if "choices" not in c:  # an error object
                final["error"] = c
                return True
            ch = c["choices"][0]
            if p.logprobs:
                lps.extend(_logprobs(ch, p))
            if ch.get("text"):
                parts.append(ch["text"])
                if emit is not None:
                    emit(ch["text"])
            if ch.get("finish_reason"):
                final.update(c)
            if cancel is not None and cancel.is_set():
                cancelled = True
                return True
            return False

        with self._lock:
            self._server.handle_completions({**req, "stream": True}, on_chunk)
        if "error" in final:
            raise RuntimeError(f"llama.cpp failed on {self.name}: {str(final['error'])[:300]}")
        usage = final.get("usage") or {}
        reason = "cancelled" if cancelled else final.get("choices", [{}])[0].get("finish_reason") or "stop"
        return Completion("".join(parts), usage.get("prompt_tokens", len(req["prompt"])),
                          usage.get("completion_tokens", len(parts)), reason, lps if p.logprobs else None)

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        return self._run(prompt, params or GenerationParams(), cancel)

    def batch(self, prompts: Sequence[Prompt], params: GenerationParams | None = None,
              cancel: threading.Event | None = None, max_batch_size: int = 16) -> list[Completion]:
        """One request after another: llama.cpp's single slot runs them at full speed each."""
        return [self.generate(p, params, cancel) for p in prompts]

    def stream(self, prompt: Prompt, params: GenerationParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Yield text as llama.cpp writes it. Closing the iterator early (or setting `cancel`) stops generation."""
        p = params or GenerationParams()
        cancel = cancel or threading.Event()

        def work(put: Any) -> Completion:
            return self._run(prompt, p, cancel, put)

        with contextlib.closing(thread_stream(work, cancel, "tunesmith-llamacpp")) as events:
            for kind, val in events:
                yield Chunk("", done=True, completion=val, logprobs=val.logprobs) if kind == "done" else Chunk(val)

    def score(self, *a: Any, **kw: Any) -> Any:
        raise UnsupportedRequest("scoring answers needs the transformers engine (--engine transformers).")

    def prompt_logprobs(self, *a: Any, **kw: Any) -> Any:
        raise UnsupportedRequest("log-probabilities of a prompt (echo) need the transformers engine "
                                 "(--engine transformers).")


def load_llamacpp(source: str | os.PathLike[str], quant: str = "f16", **kw: Any) -> LlamaCppGenerator:
    """A .gguf file as it is, or a run / merged folder / `embedded` through its GGUF: exported (and checked) once,
    to RUN/gguf/NAME-QUANT.gguf (other models: the tunesmith cache), and reused until the adapter is retrained."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    from .model import cache_dir, load_tokenizer, resolve_source

    src = resolve_source(source)
    if src.kind == "gguf":
        tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(Path(src.location).parent),
                                                                     gguf_file=Path(src.location).name)
        return LlamaCppGenerator(src.location, tok, src.name, {}, **kw)
    if src.kind in ("adapter", "hub"):
        raise ModelLoadError(f"--engine llama.cpp serves a run, a merged folder, `embedded` or a .gguf file; {source} "
                             f"is {'a bare adapter' if src.kind == 'adapter' else 'a hub id'}. Use --engine transformers.")
    home = Path(src.location) if src.kind == "run" else cache_dir() / "export"
    path = home / "gguf" / f"{src.name}-{quant}.gguf"
    adapter = home / "adapter" / "adapter_model.safetensors"
    if not path.exists() or (adapter.exists() and adapter.stat().st_mtime > path.stat().st_mtime):
        from .export import export_gguf

        export_gguf(source, quant=quant, out=path)  # first use, or retrained since the last export
    cfg: dict[str, Any] = {}
    if src.kind == "run":
        import yaml

        cfg = yaml.safe_load((home / "config.yaml").read_text()) or {}
    tok_dir = home / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else load_tokenizer(src.location)
    return LlamaCppGenerator(path, tok, src.name, cfg, **kw)
