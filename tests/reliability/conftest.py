"""Reuses the live servers of tests/ui (same tiny run, same fixtures) and the load functions of the benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_ui = _load(ROOT / "tests" / "ui" / "conftest.py", "_tunesmith_ui_conftest")
free_port, pool, api, api_with_key, ui_app = _ui.free_port, _ui.pool, _ui.api, _ui.api_with_key, _ui.ui_app
load_test = _load(ROOT / "benchmarks" / "load_test.py", "_tunesmith_load_test")


@pytest.fixture(scope="session")
def lt():
    """benchmarks/load_test.py as a module: the load functions the tests run with small counts."""
    return load_test


@pytest.fixture(scope="session")
def port() -> int:
    return free_port()
