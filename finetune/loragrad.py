"""LoRA's three gradients in one pass over a layer's output gradient (`torch.ops.tunesmith.lora_grads`), built on
first use for bf16 training on CPUs with AMX.

Why: in a compiled bf16 step of the embedded model the LoRA half of each linear layer's backward (`g @ B`,
`g.T @ h` and `gh.T @ x`: rank-16 products that read the whole output gradient twice and the input once, each as
a separate oneDNN call per adapter) cost as much as the base input gradient for 6% of its FLOPs. This kernel walks
the rows once: per block of 32 rows it computes every adapter's `gh = s * g_j @ B_j` while the block is in cache,
packs the block and the input's rows for AMX, and accumulates `B`'s and `A`'s gradients per thread (128 rows a
product, fp32), summed once at the end. Steps alternating in one process: a compiled step of 8 x 256 tokens ran
1.08x faster, of 4 x 256 1.04x (benchmarks/README.md). The base input gradient stays with oneDNN (`rowsplit.mm`) and `gh @ A` is added to it by
oneDNN's `addmm_`: a hand-written loop for either was slower.

How: ~100 lines of C++ calling torch's own batch-reduce GEMM micro-kernel (`at::native::cpublas::brgemm`: oneDNN's
AMX kernels, also called by inductor's generated CPU GEMMs), built like finetune/int8cpu.py's kernel
(`compiling.build_library`). Only on CPUs with AMX and where every tensor is bf16 on the CPU; anything else keeps
the Python loop in finetune/fused_lora.py (`fits`). Same sums in another order: `B`'s gradients equal the loop's,
`A`'s to ~1e-5 relative (fp32 accumulation either way; tests/finetune/test_loragrad.py).
"""

from __future__ import annotations

import platform

import torch

from .compiling import build_library, built_once, cpu_flags

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>

namespace {
using bf16 = at::BFloat16;
namespace cb = at::native::cpublas;
constexpr int64_t MB = 32;   // rows a block: gh for every adapter while the block is in L1/L2
constexpr int64_t SB = 128;  // rows a product for B's and A's gradients (their fp32 sums are read once per SB rows)

// dst [ceil(rows/2)][cols][2] from src [rows][cols] (row stride ld): AMX's pairs-of-rows layout; a missing odd
// last row is zero.
void vnni(const bf16* src, int64_t ld, int64_t rows, int64_t cols, bf16* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t k = 0; k < rows; k += 2) {
    const uint16_t* a = s + k * ld;
    const uint16_t* b = k + 1 < rows ? s + (k + 1) * ld : nullptr;
    uint16_t* o = d + k * cols;
    int64_t n = 0;
    if (b) {
      for (; n + 32 <= cols; n += 32) {
        const __m512i va = _mm512_loadu_si512(a + n), vb = _mm512_loadu_si512(b + n);
        const __m512i lo = _mm512_unpacklo_epi16(va, vb), hi = _mm512_unpackhi_epi16(va, vb);
        _mm512_storeu_si512(o + 2 * n, _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi));
        _mm512_storeu_si512(o + 2 * n + 32,
                            _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), hi));
      }
    }
    for (; n < cols; ++n) { o[2 * n] = a[n]; o[2 * n + 1] = b ? b[n] : 0; }
  }
}

// g [M, N] (adapter j owns columns col_j.. of width out_j), x [M, K], a [R, K] (adapters' A stacked by rows),
// bs[j] [out_j, r_j], h = x @ a.T [M, R].  Returns gh [M, R] = s_j g_j @ B_j (scaled), gA = gh.T @ x [R, K] and
// each gB_j = s_j g_j.T @ h_j [out_j, r_j].
std::vector<at::Tensor> lora_grads(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& a_,
                                   std::vector<at::Tensor> bs, const at::Tensor& h_, std::vector<double> sc) {
  const at::Tensor g = g_.reshape({-1, g_.size(-1)}).contiguous(), x = x_.reshape({-1, x_.size(-1)}).contiguous();
  const at::Tensor a = a_.contiguous(), h = h_.contiguous();
  const int64_t M = g.size(0), N = g.size(1), K = x.size(1), J = bs.size();
  std::vector<int64_t> col(J), out(J), row(J), r(J);
  int64_t R = 0, c0 = 0;
  for (int64_t j = 0; j < J; ++j) {
    col[j] = c0; out[j] = bs[j].size(0); row[j] = R; r[j] = bs[j].size(1); c0 += out[j]; R += r[j];
  }
  TORCH_CHECK(c0 == N && x.size(0) == M && h.size(0) == M && a.size(0) == R && a.size(1) == K && h.size(1) == R,
              "lora_grads: shapes do not match");
  std::vector<bf16> bpk(N * R);  // B_j as the right operand of g_j @ B_j
  std::vector<int64_t> boff(J);
  for (int64_t j = 0, o = 0; j < J; o += out[j] * r[j], ++j) {
    boff[j] = o;
    const at::Tensor bc = bs[j].contiguous();
    vnni(bc.data_ptr<bf16>(), r[j], out[j], r[j], bpk.data() + o);
  }
  at::Tensor gh = at::empty({M, R}, g.options());
  const int nt = at::get_num_threads();
  std::vector<std::vector<float>> accA(nt), accB(nt);
  const bf16* gp = g.data_ptr<bf16>();
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* hp = h.data_ptr<bf16>();
  bf16* ghp = gh.data_ptr<bf16>();
  at::parallel_for(0, (M + SB - 1) / SB, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float>& sumA = accA[at::get_thread_num()];
    std::vector<float>& sumB = accB[at::get_thread_num()];
    sumA.assign(R * K, 0.f);
    sumB.assign(R * N, 0.f);
    std::vector<float> C(MB * R);
    std::vector<bf16> ghT(R * (SB + 1)), hT(R * (SB + 1)), gpk((SB + 1) * N), xpk((SB + 1) * K);
    for (int64_t sb = s0; sb < s1; ++sb) {
      const int64_t q0 = sb * SB, srows = std::min(SB, M - q0), rp = srows + (srows & 1);
      for (int64_t r0 = q0; r0 < q0 + srows; r0 += MB) {
        const int64_t rows = std::min(MB, q0 + srows - r0), o = r0 - q0;
        const bf16* gb = gp + r0 * N;
        for (int64_t j = 0; j < J; ++j)
          cb::brgemm(rows, r[j], out[j], N, r[j], R, false, gb + col[j], bpk.data() + boff[j], C.data() + row[j]);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < J; ++j)
            for (int64_t c = row[j]; c < row[j] + r[j]; ++c) {
              const bf16 v = bf16(C[i * R + c] * float(sc[j]));
              ghp[(r0 + i) * R + c] = v;
              ghT[c * rp + o + i] = v;
            }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < R; ++c) hT[c * rp + o + i] = hp[(r0 + i) * R + c];
        vnni(gb, N, rows, N, gpk.data() + o * N);
        vnni(xp + r0 * K, K, rows, K, xpk.data() + o * K);
      }
      if (srows & 1)
        for (int64_t c = 0; c < R; ++c) hT[c * rp + srows] = ghT[c * rp + srows] = bf16(0.f);
      for (int64_t j = 0; j < J; ++j)  // gB_j.T += h_j.T @ g_j
        cb::brgemm(r[j], out[j], rp, rp, N, N, true, hT.data() + row[j] * rp, gpk.data() + 2 * col[j],
                   sumB.data() + row[j] * N + col[j]);
      cb::brgemm(R, K, rp, rp, K, K, true, ghT.data(), xpk.data(), sumA.data());  // gA += gh.T @ x
    }
    cb::brgemm_release();
  });
  for (int t = 1; t < nt; ++t) {  // in thread order: the same sums every run
    if (accA[t].empty()) continue;
    for (int64_t i = 0; i < R * K; ++i) accA[0][i] += accA[t][i];
    for (int64_t i = 0; i < R * N; ++i) accB[0][i] += accB[t][i];
  }
  std::vector<at::Tensor> res{gh};
  at::Tensor ga = at::empty({R, K}, a.options().dtype(at::kFloat));
  std::copy(accA[0].begin(), accA[0].end(), ga.data_ptr<float>());
  res.push_back(ga.to(a.scalar_type()));
  for (int64_t j = 0; j < J; ++j) {
    at::Tensor gb = at::empty({out[j], r[j]}, a.options().dtype(at::kFloat));
    float* p = gb.data_ptr<float>();
    for (int64_t n = 0; n < out[j]; ++n)
      for (int64_t c = 0; c < r[j]; ++c) p[n * r[j] + c] = accB[0][(row[j] + c) * N + col[j] + n] * float(sc[j]);
    res.push_back(gb.to(bs[j].scalar_type()));
  }
  return res;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(tunesmith, m) {
  m.def("lora_grads(Tensor g, Tensor x, Tensor a, Tensor[] bs, Tensor h, float[] scalings) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(tunesmith, CPU, m) { m.impl("lora_grads", &lora_grads); }
"""

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w"]

def _build() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if "amx_bf16" not in cpu_flags():
        return "the CPU has no AMX (oneDNN's bf16 micro-kernel would be slower than the Python loop)"
    return build_library("lora_grads", SOURCE, FLAGS)


why_not = built_once(_build)
"""Why the kernel cannot run here (None: it is loaded); builds it on the first call."""


def fits(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], h: torch.Tensor) -> bool:
    """Whether this layer's backward can run here: all bf16 on a CPU with AMX, even ranks and widths (AMX pairs
    rows)."""
    return (g.device.type == "cpu" and all(t.dtype == torch.bfloat16 for t in (g, x, a, h, *bs))
            and all(b.shape[0] % 2 == 0 and b.shape[1] % 2 == 0 for b in bs) and why_not() is None)


def lora_grads(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], h: torch.Tensor,
               scalings: list[float]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(gh, gA, [gB_j]) for output gradient `g` [M, N] and input `x` [M, K]: `gh = s_j * g_j @ B_j` per adapter's
    columns (stacked), `gA = gh.T @ x`, `gB_j = s_j * g_j.T @ h_j` (`h = x @ a.T`, adapters stacked in `a`'s rows)."""
    gh, ga, *gbs = torch.ops.tunesmith.lora_grads(g, x, a, bs, h, scalings)
    return gh, ga, gbs
