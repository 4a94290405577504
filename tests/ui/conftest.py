"""Live servers on 127.0.0.1 over the tiny run: the Gradio app and the OpenAI-compatible API."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's chromium: the browser tests' only browser (never `playwright install`)."""
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pool(tiny_run_dir: Path):
    from tunesmith.ui.pool import ModelPool

    # the runs root holds the tiny run; the default is that run, given by path as on the command line
    return ModelPool(tiny_run_dir.parent, default=str(tiny_run_dir), max_loaded=2)


@pytest.fixture(scope="session")
def ui_app(pool):
    """The Gradio app launched in-process (2 generations at once); yields the app, its URL is `app.local_url`."""
    from tunesmith.ui.app import build_app, launch

    app = launch(build_app(pool, concurrency=2), host="127.0.0.1", port=free_port(), concurrency=2, block=False)
    yield app
    app.close()


class LiveApi:
    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.app, self.url = app, f"http://127.0.0.1:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveApi:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 20 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def api(pool) -> Iterator[LiveApi]:
    from tunesmith.ui.server import build_api

    with LiveApi(build_api(pool, concurrency=4), free_port()) as live:
        yield live


@pytest.fixture(scope="session")
def api_with_key(pool) -> Iterator[LiveApi]:
    from tunesmith.ui.server import build_api

    with LiveApi(build_api(pool, api_key="sekret"), free_port()) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module (tests/ui/test_browser*.py)."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()
