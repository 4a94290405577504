"""`tunesmith ui` and `tunesmith serve`: parse flags, build the pool, start the web app or the OpenAI API."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from tunesmith import COMPILE_DECODE_HELP, DECODE_WEIGHTS_HELP, PREFILL_CHUNK_HELP, PREFIX_CACHE_HELP, PREFIX_CACHE_MIB

if TYPE_CHECKING:
    from .pool import ModelPool


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("run", nargs="?", default="embedded",
                   help="model to open with: a run folder, `embedded` (default) or a model folder")
    p.add_argument("--runs-dir", default="runs", help="folder whose finished runs can be picked without a restart")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; 0.0.0.0 exposes it to your network (use --auth / --api-key then)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--concurrency", type=int, default=16,
                   help="generations running at once (rows of one shared decode step per model); others queue")
    p.add_argument("--max-loaded", type=int, default=2, help="models kept in memory at once (least recent dropped)")
    p.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: serve runs through their GGUF (exported on first use; needs xllamacpp)")
    p.add_argument("--decode-weights", choices=["auto", "exact", "int8"], default="auto", help=DECODE_WEIGHTS_HELP)
    p.add_argument("--compile-decode", action="store_true", help=COMPILE_DECODE_HELP)
    p.add_argument("--prefix-cache-mib", type=int, default=PREFIX_CACHE_MIB, metavar="MIB", help=PREFIX_CACHE_HELP)
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS", help=PREFILL_CHUNK_HELP)


def _pool(a: argparse.Namespace) -> ModelPool:  # imported lazily so `tunesmith --help` stays fast
    from .pool import ModelPool

    return ModelPool(a.runs_dir, default=a.run, max_loaded=a.max_loaded, engine=a.engine,
                     decode_weights=a.decode_weights, compile_decode=a.compile_decode,
                     prefix_cache_mib=a.prefix_cache_mib, batch_slots=a.concurrency, prefill_chunk=a.prefill_chunk)


def _parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"--auth {value!r}: expected USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def _ui(a: argparse.Namespace) -> int:
    if a.share and not a.auth:  # checked before loading anything: a public link must never open without a login
        print("error: --share publishes this app on a public gradio.live address; add a login with "
              "--auth USER:PASSWORD (e.g. --share --auth alice:s3cret).", file=sys.stderr)
        return 2
    from .app import build_app, launch

    pool = _pool(a)
    print(f"loading {pool.default} ...", flush=True)
    pool.get(None)  # load before the first visitor, and fail here (not in a browser) if the model is broken
    launch(build_app(pool, concurrency=a.concurrency), host=a.host, port=a.port, auth=a.auth, share=a.share,
           concurrency=a.concurrency)
    return 0


API_KEY_ENV = "TUNESMITH_API_KEY"
"""Where `serve` finds the API key when --api-key is not given: a key in an environment variable stays out of `ps`
listings and shell history."""


def serve_options(a: argparse.Namespace) -> dict:
    """`serve`'s flags as `server.serve` keywords: the key from --api-key, else from TUNESMITH_API_KEY; origins split."""
    origins = [o.strip() for o in (a.cors_origins or "").split(",") if o.strip()]
    return {"api_key": a.api_key or os.environ.get(API_KEY_ENV) or None, "cors_origins": origins or None}


def _serve(a: argparse.Namespace) -> int:
    from .server import serve

    serve(_pool(a), host=a.host, port=a.port, concurrency=a.concurrency, **serve_options(a))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `ui` and `serve` on the `tunesmith` command line."""
    u = subparsers.add_parser("ui", help="web app: chat, compare runs side by side, ask your documents")
    _common(u, port=7860)
    u.add_argument("--auth", default=None, type=_parse_auth, metavar="USER:PASSWORD", help="require this login")
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth)")
    u.set_defaults(func=_ui, serving=True, extra="ui")  # extra: checked first by tunesmith.cli

    s = subparsers.add_parser("serve", help="OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                                            "/v1/embeddings, /v1/models")
    _common(s, port=8000)
    s.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every request (default: ${API_KEY_ENV}, if set)")
    s.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                   help="comma-separated web origins allowed to call the API from a browser, e.g. "
                        "http://localhost:3000 (`*` for any); off by default")
    s.set_defaults(func=_serve, serving=True, extra="ui")
