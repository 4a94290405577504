"""train.compile: compiled decoder layers train to the losses of eager layers, the padding that keeps compiled shapes
few changes no loss, and `auto` compiles only where it pays (not the tiny models of the other tests)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.finetune import compiling
from tunesmith.finetune.config import load_config
from tunesmith.finetune.data import collate
from tunesmith.finetune.trainer import fit, setup, train

ROOT = Path(__file__).parents[2]
DATA = str(ROOT / "tests" / "fixtures" / "messages.jsonl")


def _cfg(model_dir, out, *extra):
    return load_config(None, [
        f"base_model={model_dir}", f"output_dir={out}", f"data.train=[{DATA}, {ROOT}/tests/fixtures/alpaca.json]",
        "data.val_set_size=0.2", "data.max_length=64", "train.lr=1e-2", "train.max_steps=4",
        "train.micro_batch_size=2", "train.warmup_steps=0", "train.eval_every=2", "train.save_every=0", "lora.r=4",
        "lora.dropout=0", "seed=0", *extra])


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("precision", "packing", "rtol", "extra"), [
    ("fp32", "true", 1e-4, "finetuning_type=lora"), ("bf16", "false", 2e-2, "finetuning_type=lora"),
    ("fp32", "true", 1e-4, "finetuning_type=full")])
def test_compiled_layers_train_like_eager(tiny_model_dir, tmp_path, precision, packing, rtol, extra):
    """Same losses step by step and the same eval loss (fp32: to 1e-4; bf16: within its rounding), packed rows (one
    padded shape) and unpacked ones (widths padded to a multiple of 64, then dynamic shapes), LoRA and full
    fine-tuning (weight gradients through the compiled layers)."""
    if compiling.compiler() is None:
        pytest.skip("no C++ compiler for inductor's CPU backend")
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        train(_cfg(tiny_model_dir, out, f"train.compile={mode}", f"train.precision={precision}",
                   f"data.packing={packing}", extra))
        runs[mode] = _rows(out)
    eager, compiled = runs["off"], runs["on"]
    for key in ("loss", "eval_loss"):
        ours, theirs = ([r[key] for r in rows if key in r] for rows in (compiled, eager))
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, rel=rtol), key


def test_compile_on_wraps_each_decoder_layer_and_keeps_state_dict_names(tiny_model_dir, tmp_path):
    s = setup(_cfg(tiny_model_dir, tmp_path / "r", "train.compile=on"))
    causal = s.model.get_base_model()
    layers = [m for m in causal.modules() if type(m).__name__ in causal._no_split_modules]
    assert layers and all(m._compiled_call_impl is not None for m in layers)
    assert causal.config._attn_implementation == "eager"  # max_length 64 <= EAGER_ATTENTION_MAX_LENGTH
    assert not any("_orig_mod" in n for n in s.model.state_dict())
    assert s.pad == {"width": 64, "rows": 2} and s.compiled


def test_padding_for_few_shapes_changes_no_loss(tiny_model_dir, tmp_path):
    s = setup(_cfg(tiny_model_dir, tmp_path / "r", "train.precision=fp32", "train.compile=off"))
    pad = s.tokenizer.pad_token_id
    for packed, extra in ((True, {"width": 64, "rows": 5}), (False, {"multiple": 64})):
        batch = s.batches[0] if packed else [ex for row in s.batches[0] for ex in row]
        plain, padded = collate(batch, packed, pad), collate(batch, packed, pad, **extra)
        assert padded["input_ids"].shape[1] == 64
        if packed:
            assert padded["input_ids"].shape[0] == 5
        with torch.no_grad():
            a, b = (float(s.loss_model(**x)) for x in (plain, padded))
        assert b == pytest.approx(a, rel=1e-5)


def test_auto_compiles_only_where_it_pays(tiny_model_dir, tmp_path):
    cpu = torch.device("cpu")
    cfg = _cfg(tiny_model_dir, tmp_path / "r")
    assert cfg.train.compile == "auto"
    big, steps = 135_000_000, 100
    assert (compiling.why_not(cfg, cpu, 1, big, steps) is None) == (compiling.compiler() is not None)
    for kwargs, reason in (({"n_params": 1_000_000}, "1.0M parameters"), ({"steps": 5}, "5 steps"),
                           ({"processes": 2}, "2 processes"), ({"device": torch.device("meta")}, "meta device")):
        args = {"device": cpu, "processes": 1, "n_params": big, "steps": steps, **kwargs}
        assert reason in (compiling.why_not(cfg, **args) or "")
    assert "method dpo" in (compiling.why_not(_cfg(tiny_model_dir, tmp_path / "d", "method=dpo"), cpu, 1, big, steps)
                            or "")
    assert compiling.why_not(_cfg(tiny_model_dir, tmp_path / "o", "train.compile=on"), cpu, 2, 1, 1) is None
    assert compiling.why_not(_cfg(tiny_model_dir, tmp_path / "f", "train.compile=off"), cpu, 1, big, steps)


def test_trainings_of_many_shapes_in_one_process_keep_compiling(tiny_model_dir, tmp_path, monkeypatch):
    """An in-process sweep over LoRA ranks adds two graphs per rank to the one function every decoder layer runs
    through; past dynamo's limit (8) its fifth trial trained eager, silently. Each compiled training now makes room
    for its own. Here dynamo's limit starts at 2 (patched for this thread) so that three short trainings cross it."""
    monkeypatch.setattr(compiling, "DYNAMO_GRAPHS", 2)
    hits: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: hits.append(record.getMessage())  # type: ignore[method-assign]
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for r in (2, 3, 5):
                train(_cfg(tiny_model_dir, tmp_path / f"r{r}", "train.compile=on", f"lora.r={r}",
                           "train.max_steps=1", "train.eval_every=0", "data.val_set_size=0"))
                assert torch._dynamo.config.recompile_limit == compiling.graph_limit()
    finally:
        dynamo_log.removeHandler(handler)
    assert not [m for m in hits if "recompile_limit" in m or "cache_size_limit" in m]


def test_yaml_on_off_booleans_read_as_modes(tmp_path):
    f = tmp_path / "c.yaml"
    for text, mode in (("off", "off"), ("on", "on"), ("true", "on"), ("auto", "auto")):
        f.write_text(f"base_model: embedded\ndata:\n  train: [{DATA}]\ntrain:\n  compile: {text}\n")
        assert load_config(f).train.compile == mode


def test_compiled_resume_is_exact(tiny_model_dir, tmp_path):
    """6 compiled steps straight == the step-3 checkpoint resumed to 6, with LoRA dropout (inductor's own random
    numbers, seeded from torch's generator, which the checkpoint restores): losses and final weights equal."""
    if compiling.compiler() is None:
        pytest.skip("no C++ compiler for inductor's CPU backend")
    extra = ("train.compile=on", "train.precision=fp32", "train.max_steps=6", "train.save_every=3",
             "train.eval_every=0", "lora.dropout=0.1", "train.keep_checkpoints=5")
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(tiny_model_dir, full, *extra))
    shutil.copytree(full / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    rows = (full / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")
    fit(setup(_cfg(tiny_model_dir, part, *extra), resume=True), resume=True)
    losses = [[r["loss"] for r in _rows(out) if "loss" in r] for out in (full, part)]
    assert len(losses[0]) == 6 and losses[1] == losses[0]
    wa, wb = (load_file(str(out / "adapter" / "adapter_model.safetensors")) for out in (full, part))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_kernels_are_cached_in_tunesmiths_folder_not_torchs_tmp_default(monkeypatch, tmp_path):
    """Importing torch._dynamo writes torch's /tmp default into TORCHINDUCTOR_CACHE_DIR: that counts as unset, while a
    folder the user chose is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiling.use_cache_dir()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiling.use_cache_dir()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "mine"


def test_forward_graph_rounds_like_eager_and_backward_graph_keeps_fp32(monkeypatch):
    """`compiling.backend` lowers the forward graph with eager's bf16 rounding (the loss matches eager's) and the
    backward graph without it (its RMSNorm and RoPE kernels ran 2-4x slower with it): the graphs reaching inductor's
    lowering carry the rounding marks, and the config, accordingly; the forward output is eager's to the bit."""
    if compiling.compiler() is None:
        pytest.skip("no C++ compiler for inductor's CPU backend")
    import torch._inductor.compile_fx as compile_fx
    from torch._inductor import config as inductor_config

    seen: list[tuple[bool, bool, bool]] = []
    real = compile_fx.compile_fx_inner

    def spy(gm: torch.fx.GraphModule, inputs: list, **kwargs) -> object:
        marked = any(n.meta.get("low_precision_pointwise_barrier") for n in gm.graph.nodes)
        seen.append((bool(kwargs.get("is_backward")), inductor_config.emulate_precision_casts, marked))
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        out = torch.compile(layer, backend=compiling.backend)(x)
        out.float().pow(2).sum().backward()
    assert seen == [(False, True, True), (True, False, False)]
    assert torch.equal(out, layer(x))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cpu_probe_runs_in_the_background_before_the_first_compile():
    """Inductor's instruction-set probe (ten child processes on an AMX Xeon) starts with the setup, on its own
    thread, and a compile waits for its answer instead of probing again (fresh process: the answer is per process)."""
    import subprocess
    import sys

    if compiling.compiler() is None:
        pytest.skip("no C++ compiler")
    code = """
import threading
from torch._inductor.cpu_vec_isa import valid_vec_isa_list
from tunesmith.finetune import compiling
assert valid_vec_isa_list.cache_info().currsize == 0
compiling.start_cpu_probe()
assert any(t.name == "tunesmith-cpu-probe" for t in threading.enumerate())
compiling.wait_for_cpu_probe()
assert valid_vec_isa_list.cache_info().currsize == 1
print("probed", valid_vec_isa_list())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "probed" in r.stdout, r.stderr[-2000:]
