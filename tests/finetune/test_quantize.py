"""Int8 decode weights: close to exact where used, bit-exact everywhere else (prompts, scoring, training)."""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunesmith.finetune import int8cpu
from tunesmith.finetune.generate import GenerationParams, load_generator
from tunesmith.finetune.quantize import Int8DecodeLinear, int8_reads, kernel_dtype, max_rows, resolve_decode_weights

GREEDY = GenerationParams(max_new_tokens=6, temperature=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_reads_int8_only_for_few_rows_inside_generation(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(dtype)
    q = Int8DecodeLinear(lin)
    assert q.weight is lin.weight and q.bias is lin.bias  # tied weights stay tied
    assert q.qscale.dtype == kernel_dtype(dtype, lin.weight.shape)
    qw = int8cpu.unpack(q.qweight) if q.qweight.dim() == 4 else q.qweight  # packed for tunesmith's fp32 kernel
    dequant = qw.float() * q.qscale.float()[:, None]
    assert ((dequant - lin.weight.float()).abs() <= q.qscale.float()[:, None] * 0.51).all()  # round to nearest
    rows = max_rows(dtype, q.qscale.dtype)  # 64 for fp32 (16 without the AVX2 kernel), 4 for bf16 (quantize.py)
    few, many = torch.randn(1, rows, 64, dtype=dtype), torch.randn(2, rows, 64, dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(q(few), F.linear(few, lin.weight, lin.bias))  # outside generation: exact
        with int8_reads():
            got = q(few)
            assert torch.equal(q(many), F.linear(many, lin.weight, lin.bias))  # a prompt: exact weights
    want = F.linear(few.float(), dequant, lin.bias.float())
    assert not torch.equal(got, F.linear(few, lin.weight, lin.bias))  # the int8 kernel really ran
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    with int8_reads():  # a training step (grad on) never reads int8
        assert torch.equal(q(few), F.linear(few, lin.weight, lin.bias))


needs_kernel = pytest.mark.skipif(not int8cpu.available(), reason=f"no int8 kernel here: {int8cpu.why_not()}")


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k", [(4, 8), (12, 24), (52, 576), (1536, 576)])
def test_int8_kernel_matches_the_dequantized_matmul(rows: int, n: int, k: int) -> None:
    """Every path of the AVX2 kernel (one row; blocks of 3/2/1 rows; K with and without a 16-wide tail) against
    fp64 on the same int8 weights, and `pack`/`unpack` round-trip."""
    g = torch.Generator().manual_seed(n * 1000 + k + rows)
    x = torch.randn(rows, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.01
    packed = int8cpu.pack(q)
    assert torch.equal(int8cpu.unpack(packed), q)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    got = int8cpu.int8_linear(x, packed, scale)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * (float(want.abs().max()) if rows else 1.0))


@needs_kernel
def test_int8_kernel_runs_inside_torch_compile() -> None:
    """The compiled decode step calls the kernel as an opaque op (its fake kernel gives inductor the shape)."""
    q = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    packed, scale, x = int8cpu.pack(q), torch.rand(8), torch.randn(2, 16)
    f = torch.compile(lambda x: int8cpu.int8_linear(x * 2, packed, scale) + 1, fullgraph=True)
    torch.testing.assert_close(f(x), int8cpu.int8_linear(x * 2, packed, scale) + 1)


def test_without_the_kernel_fp32_decodes_through_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler (or no AVX2): the kernel is not built, and an fp32 layer reads int8 through torch's kernel on
    bf16 activations, as before the kernel existed."""
    monkeypatch.setattr("tunesmith.finetune.compiling.compiler", lambda: None)
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert "no C++ compiler" in (int8cpu._build() or "")
    monkeypatch.setattr(int8cpu, "available", lambda: False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8DecodeLinear(lin)
    assert q.qweight.shape == (48, 64) and q.qscale.dtype == torch.bfloat16
    x = torch.randn(1, 3, 64)
    with torch.inference_mode(), int8_reads():
        got = q(x)
    want = F.linear(x, q.qweight.float() * q.qscale.float()[:, None], lin.bias)
    assert not torch.equal(got, F.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_int8_run_decodes_close_to_exact_and_keeps_base_and_scoring_exact(tiny_run_dir: Path) -> None:
    exact = load_generator(tiny_run_dir, dtype=torch.float32)
    fast = load_generator(tiny_run_dir, dtype=torch.float32, decode_weights="int8")
    swapped = [n for n, m in fast.model.named_modules() if isinstance(m, Int8DecodeLinear)]
    merged = [m for m in fast.model.modules() if hasattr(m, "int8_merged_qweight")]
    assert merged and any(n.endswith("lm_head") for n in swapped)  # LoRA layers: one int8 copy, adapter merged in
    assert not any("lora_" in n or n.endswith("base_layer") for n in swapped)  # adapter and base weights stay exact
    from peft import get_peft_model_state_dict

    want = get_peft_model_state_dict(exact.model)  # the adapter's weights and names are untouched
    got = get_peft_model_state_dict(fast.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # a LoRA layer's decode call: int8 of (W + delta) ~ peft's exact base + LoRA; adapter off / grad: exact weights
    lora = merged[0]
    x = torch.randn(1, 2, lora.in_features)
    with torch.no_grad():
        ref = lora(x)
        with int8_reads():
            got_x = lora(x)
            with fast.model.disable_adapter():
                off = lora(x)
        assert not torch.equal(got_x, ref) and (got_x - ref).norm() < 0.02 * ref.norm()
        assert torch.equal(off, F.linear(x, lora.get_base_layer().weight, lora.get_base_layer().bias))
    with int8_reads():
        assert torch.equal(lora(x).detach(), ref)  # grad on (training): peft's own forward
    prompt = [{"role": "user", "content": "hello there"}]

    # one decode step's logits, int8 vs exact, through the same generate path
    p = GenerationParams(max_new_tokens=2, temperature=0, logprobs=True, top_logprobs=5)
    a, b = exact.generate(prompt, p), fast.generate(prompt, p)
    assert a.logprobs is not None and b.logprobs is not None
    assert a.logprobs[0].token == b.logprobs[0].token  # the first token comes from the (exact) prompt pass
    assert abs(a.logprobs[1].logprob - b.logprobs[1].logprob) < 0.05 or a.logprobs[1].token != b.logprobs[1].token

    # base answers per thread still skip the adapter
    tuned = fast.generate(prompt, GREEDY).text
    base = fast.generate(prompt, GenerationParams(max_new_tokens=6, temperature=0, use_adapter=False)).text
    assert tuned != base

    # scoring and prompt log-probs read the exact weights, also while another thread generates
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            fast.generate(prompt, GREEDY)

    t = threading.Thread(target=busy)
    t.start()
    try:
        assert fast.score([prompt], ["yes", "no"]) == exact.score([prompt], ["yes", "no"])
        assert fast.prompt_logprobs("a b") == exact.prompt_logprobs("a b")
    finally:
        stop.set()
        t.join()


def test_decode_weights_choice() -> None:
    assert resolve_decode_weights("auto", torch.device("cpu")) == "int8"
    assert resolve_decode_weights("auto", torch.device("cuda")) == "exact"
    with pytest.raises(ValueError, match="pick one of auto, exact, int8"):
        resolve_decode_weights("int4", torch.device("cpu"))
