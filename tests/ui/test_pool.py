"""The model pool: which names a browser or API request may ask for, and one loaded Generator per model."""

from __future__ import annotations

import os
import shutil

import pytest

from tunesmith.finetune.generate import GenerationParams
from tunesmith.ui.pool import ModelPool, UnknownModelError

GREEDY = GenerationParams(max_new_tokens=8, temperature=0)


def test_lists_runs_and_their_base(pool, tiny_run_dir):
    assert pool.default == tiny_run_dir.name
    assert pool.names()[:2] == [tiny_run_dir.name, tiny_run_dir.name + ":base"]
    choice = pool.resolve(tiny_run_dir.name + ":base")
    assert choice.use_adapter is False and choice.source == str(tiny_run_dir)


@pytest.mark.parametrize("name", [
    "../tiny-run", "..", "/etc/passwd", "tiny-run/../../etc", "~/x", "runs\\..\\x", "tiny-run/adapter", "nope",
    ".hidden", "tiny-run:base:base",
])
def test_names_outside_the_listing_are_refused(pool, name):
    with pytest.raises(UnknownModelError, match="Unknown model"):
        pool.resolve(name)


def test_symlinks_and_unfinished_runs_are_not_offered(tmp_path, tiny_run_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(tiny_run_dir, runs / "good")
    (runs / "training").mkdir()  # no adapter yet: still training
    (runs / "training" / "config.yaml").write_text("base_model: x\n")
    os.symlink(tiny_run_dir, runs / "linked")  # could point anywhere on disk
    p = ModelPool(runs, default="embedded")
    assert p.runs() == ["good"]
    assert p.names() == ["embedded", "good", "good:base"]
    with pytest.raises(UnknownModelError):
        p.resolve("linked")
    with pytest.raises(UnknownModelError):
        p.resolve("embedded:base")  # no adapter to switch off


def test_loads_once_and_keeps_at_most_max_loaded(tmp_path, tiny_run_dir, tiny_model_dir):
    p = ModelPool(tiny_run_dir.parent, default=str(tiny_model_dir), max_loaded=1)
    gen, choice = p.get(None)
    assert p.get(choice.name)[0] is gen  # cached
    tuned, _ = p.get(tiny_run_dir.name)
    base, base_choice = p.get(tiny_run_dir.name + ":base")
    assert tuned is base and base_choice.params(GREEDY).use_adapter is False  # same weights, adapter off
    assert p.loaded() == [str(tiny_run_dir)]  # the first model was dropped (max_loaded=1)


@pytest.mark.parametrize("mib", [0, 8])
def test_the_cli_prefix_cache_concurrency_and_prefill_chunk_reach_each_model(tiny_run_dir, mib):
    from tunesmith.cli import build_parser
    from tunesmith.finetune.continuous import PREFILL_CHUNK_CPU
    from tunesmith.ui.cli import _pool

    chunk = ["--prefill-chunk", "96"] if mib else []
    a = build_parser().parse_args(["serve", str(tiny_run_dir), "--runs-dir", str(tiny_run_dir.parent),
                             "--prefix-cache-mib", str(mib), "--concurrency", str(mib + 3), *chunk])
    gen, _ = _pool(a).get(None)
    assert gen._batcher is not None and gen._batcher.prefixes.budget == mib << 20
    assert gen._batcher.slots == mib + 3  # --concurrency: rows of the step
    assert gen._batcher.prefill_chunk == (96 if mib else PREFILL_CHUNK_CPU)  # the CPU's default unless set


def test_a_run_deleted_while_loading_is_said_in_words(tmp_path, tiny_run_dir, monkeypatch):
    """What transformers raises when the folder vanishes mid-load (HFValidationError: the path is read as a hub id)
    must reach the user as "removed while it was loading", not as the raw exception."""
    from huggingface_hub.errors import HFValidationError

    from tunesmith.ui import pool as pool_mod

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "doomed")
    p = ModelPool(runs, default="embedded")

    def load_after_delete(source, **kw):
        shutil.rmtree(source)
        raise HFValidationError(f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{source}'.")

    monkeypatch.setattr(pool_mod, "load_generator", load_after_delete)
    with pytest.raises(UnknownModelError, match="doomed was removed from .* while it was loading. Pick another"):
        p.get("doomed")


def test_a_broken_run_load_error_names_the_run_and_the_fix(tmp_path, tiny_run_dir, monkeypatch):
    from tunesmith.finetune.model import ModelLoadError
    from tunesmith.ui import pool as pool_mod

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run_dir, runs / "broken")
    p = ModelPool(runs, default="embedded")

    def fail(source, **kw):
        raise OSError("Unable to load weights from pytorch checkpoint file")

    monkeypatch.setattr(pool_mod, "load_generator", fail)
    with pytest.raises(ModelLoadError, match="Could not load broken from .*OSError: Unable to load weights.*a run "
                                             "needs config.yaml and adapter/") as e:
        p.get("broken")
    assert not isinstance(e.value, UnknownModelError)
