"""`tunesmith ui` and `tunesmith serve`: parse flags, build the pool, start the web app or the OpenAI API."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ModelPool


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("run", nargs="?", default="embedded",
                   help="model to open with: a run folder, `embedded` (default) or a model folder")
    p.add_argument("--runs-dir", default="runs", help="folder whose finished runs can be picked without a restart")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; 0.0.0.0 exposes it to your network (use --auth / --api-key then)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--concurrency", type=int, default=4, help="generations running at once; others queue")
    p.add_argument("--max-loaded", type=int, default=2, help="models kept in memory at once (least recent dropped)")


def _pool(a: argparse.Namespace) -> ModelPool:  # imported lazily so `tunesmith --help` stays fast
    from .pool import ModelPool

    return ModelPool(a.runs_dir, default=a.run, max_loaded=a.max_loaded)


def _parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"--auth {value!r}: expected USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def _ui(a: argparse.Namespace) -> int:
    from .app import build_app, launch

    pool = _pool(a)
    print(f"loading {pool.default} ...", flush=True)
    pool.get(None)  # load before the first visitor, and fail here (not in a browser) if the model is broken
    launch(build_app(pool, concurrency=a.concurrency), host=a.host, port=a.port, auth=a.auth, share=a.share,
           concurrency=a.concurrency)
    return 0


def _serve(a: argparse.Namespace) -> int:
    from .server import serve

    serve(_pool(a), host=a.host, port=a.port, api_key=a.api_key, concurrency=a.concurrency)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `ui` and `serve` on the `tunesmith` command line."""
    u = subparsers.add_parser("ui", help="web app: chat, compare runs side by side, ask your documents")
    _common(u, port=7860)
    u.add_argument("--auth", default=None, type=_parse_auth, metavar="USER:PASSWORD", help="require this login")
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    u.set_defaults(func=_ui)

    s = subparsers.add_parser("serve", help="OpenAI-compatible API: /v1/chat/completions and /v1/models")
    _common(s, port=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    s.set_defaults(func=_serve)
