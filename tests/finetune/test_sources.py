"""One resolver for model names (run, adapter, model folder, .gguf, `embedded`, hub id), and the Hub check that
makes one load offline without turning the whole process offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tunesmith.finetune import ModelLoadError, resolve_source
from tunesmith.finetune import model as model_mod


def test_each_kind_of_source(tiny_run_dir: Path, tiny_model_dir: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_source("Embedded").kind == "embedded"
    run = resolve_source(tiny_run_dir)
    assert (run.kind, run.location, run.name) == ("run", str(tiny_run_dir.resolve()), tiny_run_dir.name)
    assert resolve_source(tiny_run_dir / "adapter").kind == "adapter"
    assert resolve_source(tiny_model_dir).kind == "model_dir"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source("m.gguf") == model_mod.Source("gguf", str(gguf), "m.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"  # no such local folder: a hub id


def test_not_found_is_one_message_with_the_folders_nearby(tmp_path: Path, tiny_run_dir: Path) -> None:
    (tmp_path / "runs" / "real-run").mkdir(parents=True)
    for name in (tmp_path / "runs" / "typo", tmp_path / "missing.gguf", "./nope"):
        with pytest.raises(ModelLoadError, match=r"No run or model at .*embedded"):
            resolve_source(name)
    with pytest.raises(ModelLoadError, match=r"Folders in .*runs: real-run"):
        resolve_source(tmp_path / "runs" / "typo")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="not a run .* or a Hugging Face model folder"):
        resolve_source(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="notes.txt is a file but not a .gguf model"):
        resolve_source(empty / "notes.txt")
    with pytest.raises(ModelLoadError, match="tunesmith run folder, not a base model.*tunesmith merge"):
        model_mod.resolve_base_model(str(tiny_run_dir))


def test_a_dns_failure_makes_one_call_local_only_and_never_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_mod, "_dns", None)
    now = [1000.0]
    monkeypatch.setattr(model_mod, "_clock", lambda: now[0])
    calls: list[str] = []
    dns_up = [False]

    def getaddrinfo(host: str, *args: object, **kw: object) -> list[object]:
        calls.append(host)
        if not dns_up[0]:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return []

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    offline_before = hub_constants.HF_HUB_OFFLINE
    assert model_mod._offline_kw("org/model") == {"local_files_only": True}
    assert model_mod._offline_kw("org/model") == {"local_files_only": True}  # the answer is reused for a while
    assert calls == ["huggingface.co"]
    assert hub_constants.HF_HUB_OFFLINE == offline_before  # the process is not switched offline

    dns_up[0] = True
    now[0] += model_mod._DNS_TTL_S + 1
    assert model_mod._offline_kw("org/model") == {}  # the Hub is back: nothing forces the cache any more
    assert calls == ["huggingface.co", "huggingface.co"]
    assert hub_constants.HF_HUB_OFFLINE == offline_before


def test_local_folders_never_ask_dns(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kw: object) -> None:
        raise AssertionError("a local folder must not look up huggingface.co")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert model_mod._offline_kw(str(tiny_model_dir)) == {}


def test_no_hub_kernels_unless_asked(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.x would swap layers for Hub kernels at load (fetched on a GPU; offline, the first
    `model.train()` failed on an H200). tunesmith loads without them; USE_HUB_KERNELS=1 gives the choice back."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = model_mod.load_base_model(str(tiny_model_dir))
    model.train()
    assert model.use_kernels is False and model.kernels_mode is None
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert model_mod._kernels_kw() == {}
    assert model_mod.load_base_model(str(tiny_model_dir)).use_kernels is True  # transformers' own default
