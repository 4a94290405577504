"""An AVX2 int8-weight matrix-vector kernel for fp32 models (`torch.ops.tunesmith.int8_linear`), built on first use.

Why: on a CPU without fast bf16 (`model.pick_dtype` then picks fp32), torch's weight-only int8 kernel
(`_weight_int8pack_mm`) has a scalar fp32 path and a bf16 one that is compute-bound: measured on an idle 2-core AMD
EPYC (AVX2 only, ~33 GB/s read), it reads SmolLM2-135M's int8 weights at 6-10 GB/s, 14.6 ms a token, ~70% of a
compiled decode step. This kernel converts eight int8 weights to fp32 per instruction, keeps four output rows'
sums (two each) in flight over a packed weight that is one sequential read (`pack`), and takes fp32 activations as
they are (no bf16 rounding): 15-20 GB/s on large matrices, 1.4-2.3x torch's kernel on SmolLM2's shapes (measured,
benchmarks/README.md); a profiled compiled decode step's int8 reads went from 16 ms a token to 5.5-8.2. For 2-16
rows (batched decode) each widened weight vector feeds up to three rows: ~78% of the fp32 matmul peak at 16 rows,
1.5-2.2x torch's kernel (`benchmarks/int8_kernel.py`).

How: ~100 lines of C++ against torch's own headers, compiled once per machine with the C++ compiler torch.compile
uses (~10-15 s on two cores) into `cache_dir()/kernels` and loaded (`compiling.build_library`); it splits output
rows over torch's own thread pool (`at::parallel_for`). Anything other than an x86-64 CPU with AVX2 and FMA, or no
compiler, keeps torch's kernel (`available()` is False and `why_not()` says why).
"""

from __future__ import annotations

import platform

import torch

from .compiling import build_library, built_once

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 widen(const int8_t* p) {  // eight int8 -> eight fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One block: four output rows, packed [K/8][4][8] (`pack` in int8cpu.py), so the block is one sequential read.
// One activation row: the int8 weights widen straight into the sums (two sums a row in flight).
inline void block1(const float* x, const int8_t* w, const float* scale, float* out, int64_t K) {
  __m256 a[4], b[4];
  for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16, w += 64) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm256_fmadd_ps(x0, widen(w + 8 * r), a[r]);
      b[r] = _mm256_fmadd_ps(x1, widen(w + 32 + 8 * r), b[r]);
    }
  }
  if (k < K) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) a[r] = _mm256_fmadd_ps(x0, widen(w + 8 * r), a[r]);
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum(_mm256_add_ps(a[r], b[r])) * scale[r];
}

// Several activation rows (batched decode): each widened weight vector feeds T multiply-adds, 4 * T sums in flight.
// Widening on the fly, as for one row, beat widening a block once into an L1 buffer and reading that for each
// row (measured, 16 rows: 121 -> 135 GFLOP/s; 2 rows: 46 -> 90): the conversions run beside the multiply-adds.
template <int T>
inline void rows(const float* x, const int8_t* w, const float* scale, float* out, int64_t N, int64_t K) {
  __m256 a[T][4];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < 4; ++r) a[t][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = widen(w + 4 * k + 8 * r);
      for (int t = 0; t < T; ++t) a[t][r] = _mm256_fmadd_ps(xv[t], wv, a[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < 4; ++r) out[t * N + r] = hsum(a[t][r]) * scale[r];
}

// Rows in threes, the rest in twos (M >= 2): a lone row's loop kept its sums on the stack (4 rows ran as slowly as 8).
inline void blockm(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N,
                   int64_t K) {
  const int64_t twos = M % 3 == 0 ? 0 : M % 3 == 2 ? 1 : 2;
  int64_t m = 0;
  for (; m < M - 2 * twos; m += 3) rows<3>(x + m * K, w, scale, out + m * N, N, K);
  for (; m < M; m += 2) rows<2>(x + m * K, w, scale, out + m * N, N, K);
}

// x [M, K] fp32, packed [N/4, K/8, 4, 8] int8 (N, K multiples of 4 and 8), scale [N] fp32 -> [M, N] fp32
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "int8_linear needs AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 4 && packed.size(3) == 8 && scale.dim() == 1,
              "int8_linear: x [M, K], packed [N/4, K/8, 4, 8], scale [N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kChar &&
              scale.scalar_type() == at::kFloat, "int8_linear: fp32 x, int8 packed weight, fp32 scale");
  TORCH_CHECK(x.size(1) == packed.size(1) * 8 && scale.size(0) == packed.size(0) * 4, "int8_linear: shapes differ");
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous(), sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = sc.size(0), blocks = N / 4;
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = pc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (4 * std::max<int64_t>(K, 8) * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* w = wp + b * 4 * K;
      if (M == 1) {
        block1(xp, w, sp + 4 * b, op + 4 * b, K);
      } else {
        blockm(xp, w, sp + 4 * b, op + 4 * b, M, N, K);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tunesmith, m) { m.def("int8_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(tunesmith, CPU, m) { m.impl("int8_linear", &int8_linear); }
"""

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w"]

def _build() -> str | None:
    """Compile (once per machine, torch version and source) and load the kernel; returns why not, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if (why := build_library("int8_linear", SOURCE, FLAGS)) is not None:
        return why

    @torch.library.register_fake("tunesmith::int8_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], scale.shape[0])

    return None


why_not = built_once(_build)
"""Why the kernel cannot run here (None: it is loaded); builds it on the first call."""


def available() -> bool:
    return why_not() is None


def fits(shape: torch.Size) -> bool:
    """Whether a weight [N, K] has the kernel's shape: N a multiple of 4, K of 8 (every model we know)."""
    return len(shape) == 2 and shape[0] % 4 == 0 and shape[1] % 8 == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/4, K/8, 4, 8]: four output rows interleaved eight weights at a time, so a block of four rows
    is one sequential read (the hardware prefetcher loses short separate rows: 11 vs 13+ GB/s measured)."""
    n, k = q.shape
    return q.reshape(n // 4, 4, k // 8, 8).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """`pack`'s inverse: [N/4, K/8, 4, 8] -> [N, K]."""
    b, k8, _, _ = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(b * 4, k8 * 8)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T` for fp32 `x` [M, K], `packed = pack(q)` of int8 `q` [N, K], fp32 `scale` [N]."""
    return torch.ops.tunesmith.int8_linear(x, packed, scale)
