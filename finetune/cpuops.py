"""tunesmith's elementwise CPU ops for bf16 training on CPUs with AVX-512 (C++, built on first use): SwiGLU's
`silu(gate) * up` and its backward (`torch.ops.tunesmith.silu_mul`), and the output head's cross-entropy with its
gradient (`torch.ops.tunesmith.cross_entropy`). Both share one exponential: 2^t by a degree-6 polynomial scaled by
`vscalefps` (relative error ~1e-7, 2^15 times below a bf16 ulp); both compute in fp32 and round once to bf16.

Why SwiGLU: inductor's kernels for the MLP's `act_fn(gate_proj(x)) * up_proj(x)` were bound by arithmetic, not
memory: per element a Sleef `exp` (accurate to 1 ulp) and a division, forward and backward. On the embedded model's
2,016 x 1,536 halves (one compiled step of 8 x 256 tokens) the forward took 1.05 ms and the backward 1.85 ms against
an add over the same bytes at 0.48 ms; here (the reciprocal an estimate refined once by Newton's step) 0.62 and
0.86 ms (benchmarks/README.md). The forward takes the gate/up group's stacked output (`[..., 2F]`: gate's F columns,
then up's; finetune/fused_lora.py computes both in one matmul) and its backward writes the gradient of that whole
tensor, so the split's backward (a concatenation) goes too.

Why the cross-entropy: finetune/loss.py's fused head took its gradient as the fp32 log-softmax of a cast of the bf16
logits, exponentiated, minus one-hot, cast back to bf16 for the head's matmul: five passes over fp32 logits, so its
chunks were kept to 64 rows (12 MB) to stay in cache, and every chunk read the 57 MB head weight twice. Here each row
is read from bf16 three times while it sits in L2 and the gradient is written in bf16 once.

Anything but bf16 on an x86 CPU with AVX-512 keeps inductor's kernels and torch's log-softmax (`fits`, `why_not`).
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from .compiling import build_library, built_once, cpu_flags

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {
using bf16 = at::BFloat16;

inline __m512 load(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store(bf16* p, __mmask16 m, __m512 v) {  // rounded to nearest even, as torch's fp32 -> bf16
#ifdef __AVX512BF16__
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
#else
  __m512i i = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  i = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // NaN stays NaN (rounding could make it inf)
  i = _mm512_mask_mov_epi32(i, nan, _mm512_set1_epi32(0x7fc00000));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(i, 16)));
#endif
}
// 2^t for t in [-126, 126]: a degree-6 polynomial of t's fraction on [-0.5, 0.5] (relative error ~1e-7) scaled by
// 2^round(t) (vscalefps)
inline __m512 exp2(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
constexpr float LOG2E = 1.4426950408889634f;
// 1 / (1 + e^-x), e^-x = 2^t with t = -x log2(e) clamped to +-100 (the result is then 0 or 1 to fp32's precision);
// the reciprocal an estimate refined by one Newton step
inline __m512 sigmoid(__m512 x) {
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(-LOG2E));
  t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  const __m512 d = _mm512_add_ps(exp2(t), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}
// e^x for x <= 0; exactly 0 below -87 (where fp32 would go subnormal), as torch's exp rounds it
inline __m512 exp_neg(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, exp2(_mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)),
                                                       _mm512_set1_ps(LOG2E))));
}
inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

void check(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1 && t.scalar_type() == at::kBFloat16 && t.device().is_cpu(),
              "tunesmith::", op, ": ", name, " must be a 2-D bf16 CPU tensor with contiguous rows");
}

// y [M, 2F] (gate | up) -> silu(gate) * up [M, F]
at::Tensor silu_mul(const at::Tensor& y) {
  check(y, "silu_mul", "y");
  TORCH_CHECK(y.size(1) % 2 == 0, "tunesmith::silu_mul: y's width must be even (gate's columns, then up's)");
  const int64_t m = y.size(0), f = y.size(1) / 2, ld = y.stride(0);
  at::Tensor out = at::empty({m, f}, y.options());
  const bf16* src = y.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, m, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* g = src + r * ld;
      for (int64_t j = 0; j < f; j += 16) {
        const __mmask16 k = tail(f - j);
        const __m512 gv = load(g + j, k), uv = load(g + f + j, k);
        store(dst + r * f + j, k, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), uv));
      }
    }
  });
  return out;
}

// grad [M, F], y [M, 2F] -> [d gate | d up] [M, 2F]
at::Tensor silu_mul_backward(const at::Tensor& grad, const at::Tensor& y) {
  check(grad, "silu_mul_backward", "grad");
  check(y, "silu_mul_backward", "y");
  const int64_t m = y.size(0), f = y.size(1) / 2, ld = y.stride(0), lg = grad.stride(0);
  TORCH_CHECK(grad.size(0) == m && grad.size(1) == f, "tunesmith::silu_mul_backward: grad must be [M, F]");
  at::Tensor dy = at::empty({m, 2 * f}, y.options());
  const bf16* src = y.data_ptr<bf16>();
  const bf16* gsrc = grad.data_ptr<bf16>();
  bf16* dst = dy.data_ptr<bf16>();
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, m, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* g = src + r * ld;
      bf16* dg = dst + r * 2 * f;
      for (int64_t j = 0; j < f; j += 16) {
        const __mmask16 k = tail(f - j);
        const __m512 gv = load(g + j, k), uv = load(g + f + j, k), ov = load(gsrc + r * lg + j, k);
        const __m512 s = sigmoid(gv);
        const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));  // s (1 + g (1 - s))
        store(dg + j, k, _mm512_mul_ps(_mm512_mul_ps(ov, uv), dsilu));
        store(dg + f + j, k, _mm512_mul_ps(ov, _mm512_mul_ps(gv, s)));
      }
    }
  });
  return dy;
}

// logits [N, V] (bf16), targets [N] (int64, each in [0, V)) -> (loss [N] fp32: logsumexp - the target's logit,
// grad [N, V] bf16: softmax - onehot(target), or empty when !need). A row of V is read three times while it sits in
// L2 (max, sum of exps, gradient), in fp32.
std::vector<at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& targets, bool need) {
  check(logits, "cross_entropy", "logits");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.size(0) == logits.size(0),
              "tunesmith::cross_entropy: targets must be int64 [N]");
  const int64_t n = logits.size(0), v = logits.size(1), ld = logits.stride(0);
  const at::Tensor t = targets.contiguous();
  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor grad = need ? at::empty({n, v}, logits.options()) : at::empty({0}, logits.options());
  const bf16* src = logits.data_ptr<bf16>();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  bf16* gp = need ? grad.data_ptr<bf16>() : nullptr;
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* x = src + r * ld;
      const int64_t target = tp[r];
      TORCH_CHECK(target >= 0 && target < v, "tunesmith::cross_entropy: target ", target, " out of range");
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 k = tail(v - j);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, load(x + j, k));
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      const __m512 vm = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 k = tail(v - j);
        vsum = _mm512_mask_add_ps(vsum, k, vsum, exp_neg(_mm512_sub_ps(load(x + j, k), vm)));
      }
      const float lse = mx + std::log(_mm512_reduce_add_ps(vsum));
      lp[r] = lse - float(x[target]);
      if (!need) continue;
      const __m512 vl = _mm512_set1_ps(lse);
      bf16* g = gp + r * v;
      for (int64_t j = 0; j < v; j += 16) {
        const __mmask16 k = tail(v - j);
        store(g + j, k, exp_neg(_mm512_sub_ps(load(x + j, k), vl)));
      }
      g[target] = bf16(std::exp(float(x[target]) - lse) - 1.f);  // softmax - 1 in fp32, rounded once
    }
  });
  return {loss, grad};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(tunesmith, m) {
  m.def("silu_mul(Tensor y) -> Tensor");
  m.def("silu_mul_backward(Tensor grad, Tensor y) -> Tensor");
  m.def("cross_entropy(Tensor logits, Tensor targets, bool need) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(tunesmith, CPU, m) {
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("cross_entropy", &cross_entropy);
}
"""

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-std=c++20", "-shared",
         "-fPIC", "-w"]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    return torch.ops.tunesmith.silu_mul_backward(grad.contiguous(), y)


def _build() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    flags = cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "the CPU has no AVX-512 (inductor's kernels run instead)"
    # the fp32 -> bf16 rounding in one instruction where the CPU has it (AMX Xeons, Zen 4)
    if (why := build_library("cpuops", SOURCE, FLAGS + (["-mavx512bf16"] if "avx512_bf16" in flags else []))):
        return why
    torch.library.register_fake("tunesmith::silu_mul")(
        lambda y: y.new_empty(y.shape[0], y.shape[1] // 2))
    torch.library.register_fake("tunesmith::silu_mul_backward")(lambda grad, y: torch.empty_like(y))
    torch.library.register_autograd("tunesmith::silu_mul", _backward, setup_context=_setup_context)
    return None


why_not = built_once(_build)
"""Why the ops cannot run here (None: they are loaded); builds them on the first call. Call it before tracing:
the compiled forward only checks `fits`."""


def fits(y: torch.Tensor) -> bool:
    """Whether `silu_mul` takes this stacked gate/up output (after `why_not()` returned None)."""
    return y.device.type == "cpu" and y.dtype == torch.bfloat16 and y.shape[-1] % 2 == 0 and y.stride(-1) == 1


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `y = [..., gate | up]` (each half F wide); differentiable."""
    out = torch.ops.tunesmith.silu_mul(y.reshape(-1, y.shape[-1]))
    return out.view(*y.shape[:-1], y.shape[-1] // 2)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  need: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy (fp32) of bf16 `logits` [N, V] at `targets` [N] and (`need`) its gradient
    `softmax - onehot` in bf16, the dtype the head's matmul takes it in: one pass over the logits where
    `log_softmax` in fp32 took a cast, the log-softmax, its exponential and a cast back (after `why_not()` is None)."""
    loss, grad = torch.ops.tunesmith.cross_entropy(logits, targets, need)
    return loss.sum(), (grad if need else None)
