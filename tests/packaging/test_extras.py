"""The core installs without the front ends: training never imports them, and a command that needs a missing extra
names the one to install (one line, exit 2) instead of a traceback."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith import EXTRAS, extra_of

ROOT = Path(__file__).parents[2]
FRONT_ENDS = ("gradio", "fastapi", "uvicorn", "starlette", "langchain", "langchain_core", "langchain_text_splitters",
              "faiss")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_training_never_imports_the_front_ends():
    """Every finetune module, the parser and `tunesmith train --help`, with every extra's packages made unimportable
    (as in a core install): all import, and none pulls gradio, LangChain or FastAPI."""
    code = f"""
import importlib, json, pkgutil, sys
from tunesmith import EXTRAS
blocked = {{m: None for modules in EXTRAS.values() for m in modules}}
sys.modules.update(blocked)
import tunesmith.finetune as f
for m in pkgutil.iter_modules(f.__path__):
    importlib.import_module("tunesmith.finetune." + m.name)
from tunesmith.cli import main, parse_args
parse_args(["train", "quickstart", "train.max_steps=2"])
try:
    main(["train", "--help"])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in {FRONT_ENDS!r} and m not in blocked)))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--dry-run" in r.stdout  # the help really printed
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(("argv", "blocked", "extra"), [
    (["ui"], "gradio", "ui"),
    (["serve"], "fastapi", "ui"),
    (["ui"], "langchain_core", "ui"),  # the web app's Documents tab runs the rag chain
    (["chain", "list"], "langchain_core", "chains"),
    (["chain", "run", "classify", "--input", "The app crashes"], "faiss", "chains"),
])
def test_a_missing_extra_is_named_in_one_line(argv: list[str], blocked: str, extra: str):
    # `sys.modules[name] = None` makes the module unimportable, as if it were not installed
    code = (f"import sys; sys.modules[{blocked!r}] = None; from tunesmith.cli import main; "
            f"sys.exit(main({argv!r}))")
    r = _python(code)
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and blocked in lines[0], r.stderr
    assert f"pip install 'tunesmith[{extra}]'" in lines[0]
    assert f"`tunesmith {argv[0]}`" in lines[0]


def test_a_missing_extra_deep_inside_a_command_is_named(monkeypatch, capsys):
    """An optional package imported late (the GGUF exporter, a tracker) gets the same one line."""
    from tunesmith import cli

    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    monkeypatch.setattr(cli, "_merge", lambda a: importlib.import_module("xllamacpp"))
    assert cli.main(["merge", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: `tunesmith merge` needs xllamacpp, from the optional [export] extra: "
                           "pip install 'tunesmith[export]'")
    assert extra_of("langchain_core.runnables") == "chains" and extra_of("torch") is None


def test_extras_match_pyproject_and_are_installed():
    """EXTRAS (what the CLI checks) and pyproject.toml's extras name the same parts; the core lists none of the
    front ends; [all] is every extra; and setup.sh installed them all, under the module names EXTRAS gives."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    assert set(EXTRAS) <= set(optional)
    assert set(optional) - set(EXTRAS) == {"all", "dev"}
    assert optional["all"] == [f"tunesmith[{','.join(EXTRAS)}]"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("langchain", "faiss", "gradio", "fastapi", "uvicorn", "trl", "mlflow", "tensorboard", "xllamacpp"):
        assert name not in core, f"{name} is in the core dependencies; it belongs to an extra"
    for extra, modules in EXTRAS.items():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"[{extra}]: {module} is not installed (./setup.sh)"
