"""A built wheel, installed in a fresh venv with no checkout around, runs what a new user runs first.

Offline and fast: the wheel is installed with --no-deps, and the venv sees this project's installed dependencies
through a .pth file (no download, no torch reinstall). Only the dependencies: the project's editable install of
tunesmith is a .pth in its site-packages, which Python only runs for site directories, so it does not leak, and
the test checks that `tunesmith` is imported from the new venv.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the sources pyproject.toml names, so the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in ["pyproject.toml", "README.md", *sorted(set(setuptools["package-dir"].values()))]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    # no build isolation: the venv's setuptools builds it, so no index is needed
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist], ROOT,
         dict(os.environ))
    (found,) = dist.glob("tunesmith-*.whl")
    return found


def test_wheel_ships_every_config_and_example(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT) for folder in ("configs", "examples") for p in (ROOT / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert shipped
    missing = [str(p) for p in shipped if f"tunesmith/{p.as_posix()}" not in names]
    assert not missing, f"not in the wheel (add a glob to [tool.setuptools.package-data]): {missing}"
    assert "tunesmith/finetune/config.py" in names and "tunesmith/resources.py" in names


@pytest.fixture(scope="module")
def user(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(venv bin folder, an empty working folder, environment) for the installed wheel."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], venv,
         dict(os.environ))
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    deps = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})  # this project's dependencies
    (site / "_project_deps.pth").write_text("\n".join(deps) + "\n")
    work = tmp_path_factory.mktemp("work")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    r = _run([py, "-c", "import tunesmith, tunesmith.finetune.config as c, tunesmith.resources as r; "
                        "print(tunesmith.__file__); print(c.__file__); print(r.shipped_root())"], work, env)
    for line in r.stdout.split():
        assert line.startswith(str(venv)), f"imported from outside the fresh venv: {line}"
    return venv / "bin", work, env


def test_chain_list_and_run(user: tuple[Path, Path, dict[str, str]]):
    bin_, work, env = user
    listing = _run([bin_ / "tunesmith", "chain", "list"], work, env).stdout
    assert "classify" in listing and "rag_docs" in listing, listing
    out = _run([bin_ / "tunesmith", "chain", "run", "classify", "--input", "The app crashes when I open a file"],
               work, env).stdout.strip()
    assert out in {"bug", "feature", "question"}, out
    rag = _run([bin_ / "tunesmith", "chain", "run", "rag_docs", "--input", "How do I resume a training run?"],
               work, env).stdout
    # docs_dir: examples/docs, found in the package
    assert "Sources:" in rag and any(f.name in rag for f in (ROOT / "examples" / "docs").iterdir()), rag


def test_train_quickstart_by_name_and_by_path(user: tuple[Path, Path, dict[str, str]]):
    bin_, work, env = user
    # by relative path: no configs/ here, so the shipped one (and its shipped examples/data/train.jsonl)
    preview = _run([bin_ / "tunesmith", "data", "preview", "configs/quickstart.yaml", "-n", "1"], work, env).stdout
    assert "«" in preview and "trained on" in preview, preview
    _run([bin_ / "tunesmith", "train", "quickstart", "train.max_steps=2", "train.micro_batch_size=1",
          "train.eval_every=0", "data.val_set_size=4"], work, env, timeout=600)
    run = work / "runs" / "quickstart"  # output_dir is relative to the current folder
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_starts(user: tuple[Path, Path, dict[str, str]]):
    bin_, work, env = user
    port = _free_port()
    proc = subprocess.Popen([bin_ / "tunesmith", "ui", "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                time.sleep(1)
        assert status == 200, f"no page (exit {proc.poll()})"
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Traceback" not in out, out[-3000:]
