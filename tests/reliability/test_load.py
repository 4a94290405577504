"""Concurrent clients against the live API and UI on 127.0.0.1 (small counts; `benchmarks/load_test.py` runs
16 x 10): every request answered with the reply to its own prompt, and a dropped stream frees its generation."""

from __future__ import annotations

import pytest

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def work_and_ref(pool, tiny_run_dir, lt):
    api_work, ui_work = lt.prompts(8, 3, "api"), lt.prompts(3, 2, "ui")
    ref = lt.reference(pool, tiny_run_dir.name, [p for w in api_work + ui_work for p in w], MAX_TOKENS)
    return api_work, ui_work, ref


def test_api_under_concurrent_clients(api, tiny_run_dir, work_and_ref, lt):
    api_work, _, ref = work_and_ref
    res = lt.api_load(api.url, tiny_run_dir.name, api_work, ref, MAX_TOKENS, timeout=50)
    print("\n" + lt.table([res]))
    assert res.failures == [] and res.answered == 24


def test_ui_under_concurrent_sessions(ui_app, tiny_run_dir, work_and_ref, lt):
    _, ui_work, ref = work_and_ref
    res = lt.ui_load(ui_app.local_url, tiny_run_dir.name, ui_work, ref, MAX_TOKENS, timeout=50)
    print("\n" + lt.table([res]))
    assert res.failures == [] and res.answered == 6


def test_dropped_stream_ends_its_generate_thread(api, tiny_run_dir, lt):
    api.app.state.finished.clear()
    freed, took = lt.disconnect_frees_generation(api.url, tiny_run_dir.name)
    assert freed and took < 15
    assert list(api.app.state.finished) == [(tiny_run_dir.name, "cancelled")]


def test_percentiles_are_nearest_rank(lt):
    xs = [float(i) for i in range(1, 101)]
    assert (lt.percentile(xs, 50), lt.percentile(xs, 90), lt.percentile(xs, 99)) == (50.0, 90.0, 99.0)
    assert lt.percentile([3.0], 99) == 3.0
