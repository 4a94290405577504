"""Security defaults of the serving layer: loopback binding, keys and logins on every route, runs that cannot be
escaped, uploads read as text only, and no `trust_remote_code=True` anywhere in the serving code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

ROOT = Path(__file__).parents[2]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def _parser() -> argparse.ArgumentParser:
    from tunesmith.ui.cli import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    return p


@pytest.mark.parametrize("cmd", ["ui", "serve"])
def test_binds_to_loopback_by_default(cmd):
    a = _parser().parse_args([cmd])
    assert a.host == "127.0.0.1"
    assert (a.auth if cmd == "ui" else a.api_key) is None and getattr(a, "share", False) is False
    assert _parser().parse_args([cmd, "--host", "0.0.0.0"]).host == "0.0.0.0"  # only when told


def test_launch_and_serve_default_to_loopback():
    import inspect

    from tunesmith.ui.app import launch
    from tunesmith.ui.server import serve

    for fn in (launch, serve):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"


def test_api_key_is_checked_on_every_route(pool):
    from tunesmith.ui.server import build_api

    app = build_api(pool, api_key="sekret")
    routes = [r for r in app.routes if isinstance(r, Route)]
    assert {r.path for r in routes} >= {"/v1/models", "/v1/chat/completions"}
    with TestClient(app, raise_server_exceptions=False) as c:
        for r in routes:
            for method in r.methods - {"HEAD"}:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret2"}):
                    resp = c.request(method, r.path, headers=headers, json={"messages": []})
                    assert resp.status_code == 401, (method, r.path, headers)
                    assert resp.json()["error"]["code"] == "invalid_api_key"
        for path in ("/openapi.json", "/docs", "/nothing"):  # no schema page, and unknown paths ask for the key too
            assert c.get(path).status_code == 401
        assert c.get("/openapi.json", headers={"Authorization": "Bearer sekret"}).status_code == 404
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_oversized_body_is_refused_before_reading(pool):
    from tunesmith.ui.server import MAX_BODY_BYTES, build_api

    with TestClient(build_api(pool)) as c:
        r = c.post("/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# Gradio serves these without a login: the login page (also at /gradio_api/runs), static files, and answers that
# say nobody is logged in (token, user: null) or nothing at all (app_id, startup-events). No model, data or config.
_PUBLIC = {p + s for p in ("/", "/login", "/logout", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json",
                           "/pwa_icon", "/openapi.json", "/gradio_api/token", "/gradio_api/user", "/gradio_api/app_id",
                           "/gradio_api/runs", "/gradio_api/startup-events", "/gradio_api/theme.css")
           for s in ("", "/")}


def _routes(routes) -> list:
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        out += _routes(inner.routes) if inner is not None else [r]
    return out


@pytest.fixture(scope="module")
def ui_with_auth(pool, port):
    from tunesmith.ui.app import build_app, launch

    app = launch(build_app(pool, concurrency=1), host="127.0.0.1", port=port, auth=("alice", "s3cret"),
                 concurrency=1, block=False)
    yield app
    app.close()


def test_gradio_login_is_required_everywhere(ui_with_auth, tiny_run_dir):
    from gradio_client import Client

    url = ui_with_auth.local_url.rstrip("/")
    routes = [r for r in _routes(ui_with_auth.server_app.routes) if "{" not in getattr(r, "path", "{")]
    assert len(routes) > 20
    open_ = set()
    with httpx.Client(timeout=20) as http:
        for r in routes:
            for method in sorted((getattr(r, "methods", None) or {"GET"}) - {"HEAD"}):
                resp = http.request(method, url + r.path, json={"data": ["hi"], "fn_index": 0})
                if resp.status_code < 300:
                    open_.add(r.path)
        assert open_ <= _PUBLIC, open_ - _PUBLIC
        page = http.get(url + "/").text
        assert tiny_run_dir.name not in page and "fine-tuned model" not in page  # the login page, not the app
        for path in ("/config", "/gradio_api/info", "/gradio_api/file=/etc/passwd"):
            assert http.get(url + path).status_code == 401
    with pytest.raises(Exception, match="credentials"):
        Client(url, verbose=False)
    ok = Client(url, auth=("alice", "s3cret"), verbose=False)
    assert isinstance(ok.predict("hi", tiny_run_dir.name, "", None, 2, 0.0, 1.0, 1.0, None, api_name="/chat"), str)


@SETTINGS
@given(name=st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b: a + b, st.sampled_from(["../", "..\\", "/", "~/", "./", "%2e%2e/", "tiny-run/", ""]),
              st.text(max_size=20)),
))
def test_hypothesis_names_never_leave_the_runs_folder(pool, tiny_run_dir, name):
    from tunesmith.ui.pool import UnknownModelError

    try:
        choice = pool.resolve(name)
    except UnknownModelError:
        return
    assert choice.name.strip() in pool.names() or name.strip() == ""  # only listed names resolve
    src = Path(choice.source).resolve()
    assert src == tiny_run_dir.resolve() or src.parent == pool.runs_dir


@pytest.mark.parametrize(("name", "data", "stored"), [
    ("run_me.sh", b"#!/bin/sh\ntouch /tmp/tunesmith-pwned\n", False),  # refused: not a text kind
    ("tool.exe", b"MZ\x90\x00\x03", False),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00", False),
    ("blob.txt", b"\x00\x01\x02\xff", False),  # an allowed suffix, binary content: refused
    ("script.py", b"import os\nopen('/tmp/tunesmith-pwned', 'w')\n", True),  # kept, as text only
])
def test_uploads_are_text_only_and_never_run(tmp_path, name, data, stored):
    from tunesmith.ui.documents import store_uploads

    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(data)
    (dest := tmp_path / "session").mkdir()
    store_uploads([str(src)], dest)
    assert (dest / name).exists() is stored
    if stored:
        assert (dest / name).read_bytes() == data and not (dest / name).stat().st_mode & 0o111  # not executable
    assert not Path("/tmp/tunesmith-pwned").exists()


def test_oversize_upload_is_refused(tmp_path):
    from tunesmith.ui.documents import MAX_FILE_BYTES, store_uploads

    (big := tmp_path / "big.txt").write_bytes(b"a" * (MAX_FILE_BYTES + 1))
    (dest := tmp_path / "session").mkdir()
    assert "over the" in store_uploads([str(big)], dest)[0] and not list(dest.iterdir())


def test_gradio_upload_limit_is_set(ui_with_auth):
    from tunesmith.ui.documents import MAX_FILE_BYTES
    from tunesmith.ui.train_form import MAX_DATA_BYTES

    # Gradio itself refuses bigger uploads (413); each tab then holds its files to its own limit (store_uploads,
    # store_data: tested above and in tests/ui/test_train_form.py)
    assert ui_with_auth.max_file_size == max(MAX_FILE_BYTES, MAX_DATA_BYTES)


def test_trust_remote_code_is_never_hard_coded_on():
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("ui", "chains") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
