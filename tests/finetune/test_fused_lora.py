"""The fused LoRA linear (finetune/fused_lora.py): peft's numbers and gradients, peft's forward wherever the op does
not apply, and a training run that ends where peft's layers would have taken it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.profiler import profile

from tunesmith.finetune.config import load_config
from tunesmith.finetune.fused_lora import STACKED, FusedLoraLinear, stack_groups, use_fused_lora
from tunesmith.finetune.trainer import fit, setup

ROOT = Path(__file__).parents[2]
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json]"


def _peft_model(model_dir: Path, dtype: torch.dtype = torch.float32, **lora: object) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from tunesmith.finetune.model import load_base_model

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(model_dir), dtype=dtype), LoraConfig(r=4, target_modules="all-linear", **lora))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would hide every LoRA term
    return model


def _run(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, dict, list[str]]:
    model.zero_grad()
    with profile() as prof:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), grads, [e.name for e in prof.events()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_give_peft_outputs_and_gradients(tiny_model_dir, dtype):
    peft_model = _peft_model(tiny_model_dir, dtype)  # bf16: a bf16 base, fp32 LoRA weights, autocast (as trained)
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == 14  # 2 layers x 7 linears, all swapped
    ids = torch.randint(3, peft_model.config.vocab_size, (2, 24))
    theirs, g_theirs, ops_theirs = _run(peft_model, ids, dtype)
    ours, g_ours, ops_ours = _run(fused, ids, dtype)
    assert "_EagerLoraLinear" in ops_ours and "_EagerLoraLinearBackward" in ops_ours  # uncompiled: no op dispatch
    assert "_EagerLoraLinear" not in ops_theirs
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: peft rounds the LoRA product before adding it
    assert torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max()))
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 28
    for n in g_ours:
        assert g_ours[n].dtype == torch.float32  # fp32 LoRA weights get fp32 gradients, as under autocast
        assert torch.allclose(g_ours[n], g_theirs[n], rtol=tol, atol=tol * float(g_theirs[n].abs().max())), n
    # the swap keeps peft's module: same state dict names, and compiled it computes the same
    assert fused.state_dict().keys() == peft_model.state_dict().keys()
    assert all(isinstance(m, FusedLoraLinear) for m in fused.modules() if type(m).__name__.endswith("LoraLinear"))
    # compiled, the layer runs the two custom ops (inductor calls them as they are), siblings grouped, and gets the
    # same outputs and gradients
    layer = fused.get_base_model().model.layers[0]
    hidden = torch.randn(2, 24, peft_model.config.hidden_size, dtype=dtype, requires_grad=True)
    position = fused.get_base_model().model.rotary_emb(hidden, torch.arange(24)[None].expand(2, -1))
    results = []
    for run in (layer, torch.compile(layer, fullgraph=True)):  # fullgraph: a graph break fails the test
        fused.zero_grad()  # to None: the last run's gradients stay as they were
        hidden.grad = None
        run(hidden, position_embeddings=position).float().pow(2).sum().backward()  # compiles: ops run while tracing
        fused.zero_grad()
        hidden.grad = None
        with profile() as prof:
            out = run(hidden, position_embeddings=position)
            out.float().pow(2).sum().backward()
        grads = [hidden.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        results.append((out.detach().float(), grads, [e.name for e in prof.events()]))
    (eager_out, eager_grads, _), (comp_out, comp_grads, comp_ops) = results
    # q/k/v and gate/up run as one op each: 4 ops for the layer's 7 LoRA linears, forward and backward
    assert comp_ops.count("tunesmith::lora_linear") == comp_ops.count("tunesmith::lora_linear_backward") == 4
    assert torch.allclose(comp_out, eager_out, rtol=tol, atol=tol * float(eager_out.abs().max()))
    for c, e in zip(comp_grads, eager_grads, strict=True):
        assert torch.allclose(c.float(), e.float(), rtol=tol, atol=tol * float(e.abs().max()))


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_dropout": 0.1}])
def test_what_the_op_does_not_cover_runs_peft(tiny_model_dir, lora):
    model = _peft_model(tiny_model_dir, **lora)
    use_fused_lora(model)
    model.eval()  # dropout off, so both forwards see the same network
    ids = torch.randint(3, model.config.vocab_size, (1, 16))
    ours, _, ops = _run(model, ids, torch.float32)
    assert "_EagerLoraLinear" not in ops
    for m in model.modules():
        if isinstance(m, FusedLoraLinear):
            m.__class__ = FusedLoraLinear.__mro__[1]  # peft's own class
    assert torch.equal(ours, _run(model, ids, torch.float32)[0])


def test_training_with_fused_layers_matches_peft(tiny_model_dir, tmp_path):
    losses = {}
    for fused in (True, False):
        out = tmp_path / str(fused)
        s = setup(load_config(None, [
            f"base_model={tiny_model_dir}", f"output_dir={out}", f"data.train={DATA}", "data.val_set_size=0",
            "data.max_length=64", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=6",
            "train.micro_batch_size=2", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            "lora.r=4", "seed=0", f"train.fused_lora={fused}"]))
        assert any(isinstance(m, FusedLoraLinear) for m in s.model.modules()) == fused
        fit(s)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[fused] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 6 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


class _Together(torch.nn.Module):
    """q/k/v on one input: grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n) for n in (16, 8, 8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q[..., :8] * k + v


class _Rebound(_Together):
    """One name rebound between the calls: grouped by the source, but k and v get another tensor at run time."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)
        x = x * 2
        k, v = self.k_proj(x), self.v_proj(x)
        return q[..., :8] * k + v


class _Branch(_Together):
    """v under a branch (as Gemma 3n's layers that reuse another layer's keys and values): not grouped."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k = self.q_proj(x), self.k_proj(x)
        v = self.v_proj(x) if x.shape[0] > 0 else k
        return q[..., :8] * k + v


class _OtherInput(_Together):
    """k on another input and v never called: not grouped."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k = self.q_proj(x), self.k_proj(y)
        return q[..., :8] * k


@pytest.mark.parametrize(("parent", "grouped"), [(_Together, True), (_Rebound, True), (_Branch, False),
                                                 (_OtherInput, False)])
def test_siblings_are_grouped_where_the_forward_calls_them_together(parent, grouped):
    """Compiled (grouped where the source allows) against eager (never grouped): the same outputs and LoRA
    gradients, and no output left behind in the group."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(parent()), LoraConfig(r=2, target_modules=["q_proj",
                                                                                                 "k_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    use_fused_lora(model)
    attn = model.get_base_model()[0]
    group = attn.q_proj._group
    assert (group is not None) == grouped
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    results = []
    for run in (attn, torch.compile(attn, fullgraph=True)):
        model.zero_grad()  # to None: the last run's gradients stay as they were
        run(x, y).pow(2).sum().backward()  # compiles: ops also run while tracing, uncounted
        model.zero_grad()
        with profile() as prof:
            out = run(x, y)
            out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (eager, eager_grads), (comp, comp_grads) = results
    ops = [e.name for e in prof.events()]
    expected = {_Together: 1, _Rebound: 3, _Branch: 3, _OtherInput: 2}[parent]  # rebound: the group, k, v
    assert ops.count("tunesmith::lora_linear") == ops.count("tunesmith::lora_linear_backward") == expected
    assert torch.allclose(comp, eager, atol=1e-5)
    for c, e in zip(comp_grads, eager_grads, strict=True):
        assert (c is None and e is None) or torch.allclose(c, e, atol=1e-5)
    assert group is None or (not group.pending and group.source is None)


def test_compiled_group_uses_its_stacked_weight_once_made():
    """`stack_groups`: the compiled group computes with the stacked buffer (zeroing it changes the output, so it is
    read), which stays out of the state dict; a buffer of another dtype is ignored (the weights are concatenated)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(_Together()), LoraConfig(r=2, target_modules=["q_proj", "k_proj",
                                                                                            "v_proj"]))
    use_fused_lora(model)
    assert stack_groups(model) == 1
    attn = model.get_base_model()[0]
    assert not any(STACKED in k for k in model.state_dict())
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    compiled = torch.compile(attn, fullgraph=True)
    eager = attn(x, y)
    assert torch.allclose(compiled(x, y), eager, atol=1e-5)
    buffer = getattr(attn.q_proj, STACKED)
    kept = buffer.clone()
    buffer.zero_()
    assert not torch.allclose(compiled(x, y), eager, atol=1e-3)  # the stacked copy is what it multiplies by
    attn.q_proj.register_buffer(STACKED, kept.to(torch.bfloat16), persistent=False)
    assert torch.allclose(compiled(x, y), eager, atol=1e-5)  # a mismatched buffer is left alone
