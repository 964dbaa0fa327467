// Label-wise attention on the CPU, forward and backward, without the [B,L,N]
// score tensor. The values are h itself, or a separate v [B,N,Dv] with h's
// padding (a model folds the first linear layer after the attention into v:
// the attention weights of a row sum to 1, so Linear(ctx) = P (h A^T + b)).
//
// The work is cut into tasks (b, label block): a block of labels attends over
// the real tokens of batch row b. A task computes its scores one token tile at
// a time into a small per-thread scratch, with an online softmax across tiles
// (one tile when a row has at most kTokenTile real tokens, the usual case),
// and the backward recomputes them from the saved log-sum-exp. Padding tokens
// are dropped before any arithmetic: the real tokens of a row are gathered
// (and widened to float32) into a compact block, so padding anywhere in a row
// costs nothing. A label block holds about kTileElems scores: 128 labels at
// 256 tokens, 2,048 at 16, so short texts make few, large tasks. The scratch
// is allocated once per thread and call; nothing inside the loops over tasks
// and tiles allocates or goes through ATen's dispatcher.
//
// float32 (and the 16-bit types, which accumulate in float32) on a CPU with
// AVX-512: the exponentials are avx512.h's vectorized exp, and on short rows
// (at most kShortRow tokens, D and Dv at most kShortWidth) the products are
// its register-tiled GEMM, which reads a transposed operand in place and takes
// any size (a tile covers the real tokens only, unpadded). Longer rows and
// wider states, and any other CPU: float32 tiles go to oneDNN's batch-reduce
// GEMM micro-kernel through ATen (cpublas::brgemm, JIT-compiled for the
// running CPU; it caches one kernel per shape, so rows are padded with zeros
// to a multiple of kTokenQuantum tokens), or ATen's BLAS; float64 (kept for
// gradcheck) goes through at::mm, with std::exp. Accumulation is float32 for
// float32, bfloat16 and float16, float64 for float64. The [B,L,Dv] output
// comes from output_buffers.h (recycled, huge pages).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "avx512.h"
#include "output_buffers.h"
#include "task_split.h"

namespace {

using xmcnas_fast::cpu::balanced_split;
using xmcnas_fast::cpu::has_avx512;

constexpr int64_t kLabelBlock = 128;         // the fewest labels per task
constexpr int64_t kMaxLabelBlock = 4096;     // the most
constexpr int64_t kTileElems = 128 * 256;    // scores per tile: labels per task x tokens per tile
constexpr int64_t kTokenTile = 256;          // tokens per score tile (a multiple of kTokenQuantum)
constexpr int64_t kTokenQuantum = 16;        // rows are padded to a multiple of this many tokens
constexpr int64_t kShortRow = 64;            // the register-tiled products up to this many tokens a row
constexpr int64_t kShortWidth = 128;         // and this D and Dv (oneDNN's kernels are faster past them)

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// C[M,N] = A[M,K] B[K,N] (+ C if add); A(i, k) = A[i sam + k sak], B and C row-major.
template <typename T>
void gemm_aten(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool add) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {sam, sak}, opt);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (add)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

// The arithmetic of a task, for the accumulation type: the products, the row maximum and the
// exponentials. The products: avx512.h's when `small` (float32 on AVX-512, short rows), else oneDNN's,
// BLAS or at::mm.
template <typename acc_t>
struct Tiles;

template <>
struct Tiles<double> {
  static void gemm(bool, int64_t M, int64_t N, int64_t K, const double* A, int64_t sam, int64_t sak,
                   const double* B, int64_t ldb, double* C, int64_t ldc, bool add) {
    gemm_aten(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
  }
};

template <>
struct Tiles<float> {
  static void gemm(bool small, int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                   const float* B, int64_t ldb, float* C, int64_t ldc, bool add) {
#if XMCNAS_HAS_AVX512_CODE
    if (small) {
      xmcnas_fast::cpu::gemm_avx512(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
      return;
    }
#endif
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if (sak == 1 && M > 0 && N > 0 && K > 0) {
      at::native::cpublas::brgemm(M, N, K, sam, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
      return;
    }
#endif
    gemm_aten(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
  }
};

// The real tokens of each batch row: their positions, concatenated.
struct RealTokens {
  std::vector<int64_t> offset{0};  // B+1
  std::vector<int64_t> pos;

  explicit RealTokens(const at::Tensor& mask) {
    const int64_t B = mask.size(0), N = mask.size(1);
    const bool* m = mask.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n)
        if (m[b * N + n]) pos.push_back(n);
      offset.push_back(static_cast<int64_t>(pos.size()));
    }
  }
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
  int64_t padded(int64_t b) const { return (count(b) + kTokenQuantum - 1) / kTokenQuantum * kTokenQuantum; }
  const int64_t* positions(int64_t b) const { return pos.data() + offset[b]; }
};

// What forward and backward share: the shapes, the real tokens, W in the
// accumulation type, the labels per task, and the split of the tasks over
// threads. Tasks are (b, label block) in b-major order; the cost of one is its
// padded tokens times its labels, plus a little for the fixed work on empty rows.
struct Plan {
  int64_t B, N, D, L, np_max, tile, lb, nlb, parts;
  bool vec;    // float32 on AVX-512: the exponentials vectorized here
  bool small;  // and short rows: the register-tiled products, on the real tokens only
  RealTokens rt;
  at::Tensor Wa;
  std::vector<int64_t> bounds;  // thread range p covers tasks [bounds[p], bounds[p+1])

  Plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, int64_t Dv, at::ScalarType acc_dtype)
      : B(h.size(0)), N(h.size(1)), D(h.size(2)), L(W.size(0)), rt(mask),
        Wa(W.to(acc_dtype)) {  // W.to: no-op for f32/f64
    vec = acc_dtype == at::kFloat && has_avx512();
    np_max = 0;
    for (int64_t b = 0; b < B; ++b) np_max = std::max(np_max, rt.padded(b));
    small = vec && np_max <= kShortRow && D <= kShortWidth && Dv <= kShortWidth;
    tile = std::clamp<int64_t>(np_max, kTokenQuantum, kTokenTile);
    lb = std::clamp<int64_t>(kTileElems / tile / kTokenQuantum * kTokenQuantum, kLabelBlock, kMaxLabelBlock);
    nlb = (L + lb - 1) / lb;
    std::vector<double> cost;
    cost.reserve(B * nlb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nlb; ++j)
        cost.push_back(static_cast<double>(rt.padded(b) + 8) * static_cast<double>(std::min(lb, L - j * lb)));
    const int64_t tasks = B * nlb;
    bounds = balanced_split(cost, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
    parts = static_cast<int64_t>(bounds.size()) - 1;
  }
  // Columns of a score tile of n tokens, `real` of them real: with the register-tiled products the
  // real ones only (they take any size); otherwise the padded tile, whose few shapes oneDNN caches.
  int64_t cols(int64_t n, int64_t real) const { return small ? real : n; }
};

// The real tokens of row b of x [B,N,D] (h or v), in the accumulation type,
// as xc [Np, D] and, unless xT is null, its transpose xT [D, Np]
// (Np = rt.padded(b)), zero past the real ones.
template <typename scalar_t, typename acc_t>
void gather_real(const at::Tensor& x, const RealTokens& rt, int64_t b, acc_t* xc, acc_t* xT) {
  const int64_t N = x.size(1), D = x.size(2), nr = rt.count(b), np = rt.padded(b);
  const scalar_t* src = x.data_ptr<scalar_t>() + b * N * D;
  const int64_t* pos = rt.positions(b);
  for (int64_t j = 0; j < nr; ++j)
    for (int64_t d = 0; d < D; ++d) xc[j * D + d] = static_cast<acc_t>(src[pos[j] * D + d]);
  std::fill(xc + nr * D, xc + np * D, acc_t(0));
  if (xT == nullptr) return;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < np; ++j) xT[d * np + j] = xc[j * D + d];
}

// x [B,N,D] <- the compact rows g [Nr, D] of row b (padding tokens untouched).
template <typename scalar_t, typename acc_t>
void scatter_real(at::Tensor& x, const RealTokens& rt, int64_t b, const acc_t* g) {
  const int64_t N = x.size(1), D = x.size(2);
  scalar_t* dst = x.data_ptr<scalar_t>() + b * N * D;
  const int64_t* pos = rt.positions(b);
  for (int64_t j = 0; j < rt.count(b); ++j)
    for (int64_t d = 0; d < D; ++d) dst[pos[j] * D + d] = static_cast<scalar_t>(g[j * D + d]);
}

// Reductions over a row, split over 8 lanes so that they vectorize (or at
// least pipeline) without reassociation flags.
template <typename acc_t, typename T>
acc_t dot(const acc_t* a, const T* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * static_cast<acc_t>(b[i + k]);
  for (; i < n; ++i) s[0] += a[i] * static_cast<acc_t>(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// The softmax pieces of a tile of `rows` score rows of `cols` columns (ld = cols), `real` of them
// real tokens (real <= cols; the columns after them are padding and come out 0).
//   online_softmax: mx[i] <- max(mx[i], row max); S <- exp(S - mx[i]); sum[i] <- sum[i] scale[i] +
//     the row's sum, scale[i] = exp(old mx[i] - new mx[i]) (0 on the first tile).
//   exp_grad: P <- exp(S - lse[i]); dS <- P (dS - delta[i]). When the tile holds every real
//     token of the rows (`whole`), delta[i] is made here first, as sum_j P dP: it equals
//     grad_ctx[l] . ctx[l] (ctx is sum_j P v_j), without reading ctx.
template <typename acc_t>
void online_softmax_portable(acc_t* s, int64_t rows, int64_t cols, int64_t real, acc_t* mx, acc_t* sum,
                             acc_t* scale) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * cols;
    acc_t m = mx[i];
    for (int64_t j = 0; j < real; ++j) m = std::max(m, row[j]);
    scale[i] = std::exp(mx[i] - m);
    mx[i] = m;
    acc_t t = 0;
    for (int64_t j = 0; j < real; ++j) t += row[j] = std::exp(row[j] - m);
    std::fill(row + real, row + cols, acc_t(0));
    sum[i] = sum[i] * scale[i] + t;
  }
}

template <typename acc_t>
void exp_grad_portable(acc_t* p, acc_t* ds, int64_t rows, int64_t cols, int64_t real, const acc_t* lse,
                       acc_t* delta, bool whole) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* pr = p + i * cols;
    acc_t* dr = ds + i * cols;
    for (int64_t j = 0; j < real; ++j) pr[j] = std::exp(pr[j] - lse[i]);
    if (whole) delta[i] = dot(pr, dr, real);
    for (int64_t j = 0; j < real; ++j) dr[j] = pr[j] * (dr[j] - delta[i]);
    std::fill(pr + real, pr + cols, acc_t(0));
    std::fill(dr + real, dr + cols, acc_t(0));
  }
}

#if XMCNAS_HAS_AVX512_CODE
// The two on AVX-512, float32.
XMCNAS_AVX512 void online_softmax_avx512(float* s, int64_t rows, int64_t cols, int64_t n, float* mx, float* sum,
                                         float* scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * cols;
    std::fill(row + n, row + cols, 0.0f);
    __m512 vm = _mm512_set1_ps(mx[i]);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + j));
    if (j < n) vm = _mm512_mask_max_ps(vm, xmcnas_fast::cpu::first_lanes(n - j), vm, _mm512_maskz_loadu_ps(
                                           xmcnas_fast::cpu::first_lanes(n - j), row + j));
    const float m = _mm512_reduce_max_ps(vm);
    scale[i] = std::exp(mx[i] - m);
    mx[i] = m;
    const __m512 sub = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
      const __mmask16 k = xmcnas_fast::cpu::first_lanes(n - j);
      const __m512 e = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), sub));
      _mm512_mask_storeu_ps(row + j, k, e);
      acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    sum[i] = sum[i] * scale[i] + _mm512_reduce_add_ps(acc);
  }
}

XMCNAS_AVX512 void exp_grad_avx512(float* p, float* ds, int64_t rows, int64_t cols, int64_t n, const float* lse,
                                   float* delta, bool whole) {
  for (int64_t i = 0; i < rows; ++i) {
    float* pr = p + i * cols;
    float* dr = ds + i * cols;
    std::fill(pr + n, pr + cols, 0.0f);
    std::fill(dr + n, dr + cols, 0.0f);
    const __m512 l = _mm512_set1_ps(lse[i]);
    __m512 pd = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = xmcnas_fast::cpu::first_lanes(n - j);
      const __m512 e = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, pr + j), l));
      _mm512_mask_storeu_ps(pr + j, k, e);
      pd = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(k, dr + j), pd);
    }
    if (whole) delta[i] = _mm512_reduce_add_ps(pd);
    const __m512 dl = _mm512_set1_ps(delta[i]);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = xmcnas_fast::cpu::first_lanes(n - j);
      const __m512 e = _mm512_maskz_loadu_ps(k, pr + j);
      _mm512_mask_storeu_ps(dr + j, k, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dr + j), dl)));
    }
  }
}
#endif

template <typename acc_t>
void online_softmax(const Plan& plan, acc_t* s, int64_t rows, int64_t cols, int64_t real, acc_t* mx, acc_t* sum,
                    acc_t* scale) {
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (plan.vec) return online_softmax_avx512(s, rows, cols, real, mx, sum, scale);
  }
#endif
  online_softmax_portable(s, rows, cols, real, mx, sum, scale);
}

template <typename acc_t>
void exp_grad(const Plan& plan, acc_t* p, acc_t* ds, int64_t rows, int64_t cols, int64_t real, const acc_t* lse,
              acc_t* delta, bool whole) {
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (plan.vec) return exp_grad_avx512(p, ds, rows, cols, real, lse, delta, whole);
  }
#endif
  exp_grad_portable(p, ds, rows, cols, real, lse, delta, whole);
}

// P^T and dS^T [n, rows] of P and dS [rows, n], in blocks of 16 rows that stay in L1 (a transposing
// pass over whole rows is several times slower).
template <typename acc_t>
void transpose_pair(const acc_t* P, const acc_t* dS, acc_t* PT, acc_t* dST, int64_t rows, int64_t n) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = i0; i < i1; ++i) {
        PT[j * rows + i] = P[i * n + j];
        dST[j * rows + i] = dS[i * n + j];
      }
  }
}

// v: the values [B,N,Dv], or undefined for h itself (Dv = D).
template <typename scalar_t>
void forward_impl(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, const at::Tensor& v,
                  at::Tensor& ctx, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const bool has_v = v.defined();
  const Plan plan(h, mask, W, has_v ? v.size(2) : h.size(2), acc_dtype);
  const int64_t D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, lbk = plan.lb, nlb = plan.nlb,
                np_max = plan.np_max, tile = plan.tile;
  const RealTokens& rt = plan.rt;
  const acc_t* Wa = plan.Wa.data_ptr<acc_t>();

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    // per thread, once per call: hc, hT [Np, D], the values [Np, Dv], the score tile, the accumulator
    std::vector<acc_t> buf(2 * np_max * D + (has_v ? np_max * Dv : 0) + lbk * tile + lbk * Dv + 3 * lbk);
    acc_t* const hc = buf.data();
    acc_t* const hT = hc + np_max * D;
    acc_t* const vc = has_v ? hT + np_max * D : hc;  // the values, [Np, Dv]
    acc_t* const s = hT + np_max * D + (has_v ? np_max * Dv : 0);
    acc_t* const abuf = s + lbk * tile;
    acc_t* const mx = abuf + lbk * Dv;
    acc_t* const sum = mx + lbk;
    acc_t* const scale = sum + lbk;
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cur_b = -1;
      for (int64_t task = plan.bounds[p]; task < plan.bounds[p + 1]; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * lbk;
        const int64_t lb = std::min(lbk, L - l0), nr = rt.count(b), np = rt.padded(b);
        if (b != cur_b) {
          gather_real<scalar_t>(h, rt, b, hc, hT);
          if (has_v) gather_real<scalar_t>(v, rt, b, vc, static_cast<acc_t*>(nullptr));
          cur_b = b;
        }
        scalar_t* out = ctx.data_ptr<scalar_t>() + (b * L + l0) * Dv;
        float* lse_out = lse.data_ptr<float>() + b * L + l0;
        if (nr == 0) {  // no real token: zero context, lse = +inf
          std::fill(out, out + lb * Dv, scalar_t(0));
          std::fill(lse_out, lse_out + lb, std::numeric_limits<float>::infinity());
          continue;
        }
        const acc_t* Wb = Wa + l0 * D;
        // float32 / float64 accumulate straight into ctx
        acc_t* acc = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out) : abuf;
        std::fill(mx, mx + lb, -std::numeric_limits<acc_t>::infinity());
        std::fill(sum, sum + lb, acc_t(0));
        for (int64_t t0 = 0; t0 < np; t0 += tile) {
          const int64_t n = std::min(tile, np - t0), real = std::min(n, nr - t0), c = plan.cols(n, real);
          T::gemm(plan.small, lb, c, D, Wb, D, 1, hT + t0, np, s, c, false);  // scores of this tile
          online_softmax(plan, s, lb, c, real, mx, sum, scale);
          if (t0 > 0)
            for (int64_t i = 0; i < lb; ++i)
              for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= scale[i];
          T::gemm(plan.small, lb, Dv, c, s, c, 1, vc + t0 * Dv, Dv, acc, Dv, t0 > 0);
        }
        for (int64_t i = 0; i < lb; ++i) {
          const acc_t inv = acc_t(1) / sum[i];
          for (int64_t d = 0; d < Dv; ++d) out[i * Dv + d] = static_cast<scalar_t>(acc[i * Dv + d] * inv);
          lse_out[i] = static_cast<float>(mx[i] + std::log(sum[i]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> label_attention_cpu(const at::Tensor& h_in, const at::Tensor& mask_in,
                                                       const at::Tensor& W_in,
                                                       const std::optional<at::Tensor>& v_in) {
  xmcnas_fast::checks::label_attention_inputs(h_in, mask_in, W_in, v_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls on tiles are not recorded
  const at::Tensor h = h_in.contiguous(), mask = mask_in.contiguous(), W = W_in.contiguous();
  const at::Tensor v = v_in ? v_in->contiguous() : at::Tensor();
  const int64_t B = h.size(0), Dv = v.defined() ? v.size(2) : h.size(2), L = W.size(0);
  at::Tensor ctx = xmcnas_fast::cpu::empty_output({B, L, Dv}, h.options());
  at::Tensor lse = at::empty({B, L}, h.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention", [&] {
    forward_impl<scalar_t>(h, mask, W, v, ctx, lse);
  });
  return {ctx, lse};
}

// Backward. With p = exp(s - lse), values u_n (v[b,n], or h[b,n] without v)
// and ds = p * (grad_ctx[l].u_n - grad_ctx[l].ctx[l]):
//   grad_v[b,n] = sum_l p grad_ctx[b,l],   grad_h[b,n] = sum_l ds W[l],
//   grad_W[l] = sum_{b,n} ds h[b,n];
// without v, grad_h gets both sums over l (the two products accumulate into
// one buffer: the arithmetic is that of separate values aliased to h).
// Races: the tasks are split into per-thread ranges in b-major order, so a
// thread sees every label block of most of its rows. grad_W gets one
// accumulator per thread ([L,D]: small beside the activations), summed in
// thread order afterwards. grad_h (and grad_v) of a row is owned by the
// thread whose range covers all of that row's tasks and written once; a row
// cut between two ranges (at most two per thread) is handed back as a
// partial sum and added after the parallel region. Fixed reduction order:
// results do not depend on scheduling.
template <typename scalar_t>
void backward_impl(const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask,
                   const at::Tensor& W, const at::Tensor& v, const at::Tensor& ctx, const at::Tensor& lse,
                   at::Tensor& grad_h, at::Tensor& grad_W, at::Tensor& grad_v) {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const bool has_v = v.defined();
  const Plan plan(h, mask, W, has_v ? v.size(2) : h.size(2), acc_dtype);
  const int64_t B = plan.B, D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, lbk = plan.lb, nlb = plan.nlb,
                np_max = plan.np_max, tile = plan.tile;
  const RealTokens& rt = plan.rt;
  const acc_t* Wa = plan.Wa.data_ptr<acc_t>();
  const auto opt = h.options().dtype(acc_dtype);
  // one grad_W accumulator per thread range; the first is grad_W itself when it is float32 / float64
  std::vector<at::Tensor> gW_parts(plan.parts);
  for (int64_t p = 0; p < plan.parts; ++p)
    gW_parts[p] = p == 0 && std::is_same_v<scalar_t, acc_t> ? grad_W : at::empty({L, D}, opt);
  struct CutRow {
    int64_t b;
    at::Tensor gh, gv;  // partial sums, compact [Nr, D] and [Nr, Dv] (gv only with v)
  };
  std::vector<std::vector<CutRow>> cut_rows(plan.parts);

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    // per thread, once per call: hc, hT, gh [Np, D] each, then with v: vT, gv [Np, Dv] each; the
    // tiles P and dS [lb, tile] each (and their transposes, but for the register-tiled products, which
    // read them in place); grad_ctx widened [lb, Dv]; delta and lse [lb]
    const int64_t tiles = plan.small ? 2 : 4;
    std::vector<acc_t> buf(3 * np_max * D + (has_v ? 2 * np_max * Dv : 0) + tiles * lbk * tile + lbk * Dv + 2 * lbk);
    acc_t* const hc = buf.data();
    acc_t* const hT = hc + np_max * D;
    acc_t* const gh = hT + np_max * D;                          // grad of the current row's real tokens, [Np, D]
    acc_t* const vT = has_v ? gh + np_max * D : hT;             // the values transposed, [Dv, Np]
    acc_t* const gv = has_v ? vT + np_max * Dv : gh;            // grad of the values, [Np, Dv]
    acc_t* const pp = gh + np_max * D + (has_v ? 2 * np_max * Dv : 0);  // [lb, tile]: P
    acc_t* const ds = pp + lbk * tile;                          // [lb, tile]: dP, then dS
    acc_t* const pT = ds + lbk * tile;                          // [tile, lb]
    acc_t* const dsT = pT + lbk * tile;                         // [tile, lb]
    acc_t* const gbuf = ds + (tiles - 1) * lbk * tile;
    acc_t* const delta = gbuf + lbk * Dv;
    acc_t* const lse_b = delta + lbk;
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* const gW = gW_parts[p].template data_ptr<acc_t>();
      std::fill(gW, gW + L * D, acc_t(0));
      const int64_t first = plan.bounds[p], last = plan.bounds[p + 1];
      int64_t cur_b = -1;
      auto flush = [&] {
        const int64_t nr = cur_b < 0 ? 0 : rt.count(cur_b);
        if (nr == 0) return;
        if (cur_b * nlb >= first && (cur_b + 1) * nlb <= last) {  // the whole row is ours
          scatter_real<scalar_t>(grad_h, rt, cur_b, gh);
          if (has_v) scatter_real<scalar_t>(grad_v, rt, cur_b, gv);
        } else {
          const auto copy = [&](const acc_t* src, int64_t n) {
            at::Tensor t = at::empty({n}, opt);
            std::copy(src, src + n, t.template data_ptr<acc_t>());
            return t;
          };
          cut_rows[p].push_back({cur_b, copy(gh, nr * D), has_v ? copy(gv, nr * Dv) : at::Tensor()});
        }
      };
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * lbk;
        const int64_t lb = std::min(lbk, L - l0), nr = rt.count(b), np = rt.padded(b);
        if (b != cur_b) {
          flush();
          cur_b = b;
          gather_real<scalar_t>(h, rt, b, hc, hT);
          std::fill(gh, gh + np * D, acc_t(0));
          if (has_v) {
            gather_real<scalar_t>(v, rt, b, gv, vT);  // gv as scratch for the compact copy
            std::fill(gv, gv + np * Dv, acc_t(0));
          }
        }
        if (nr == 0) continue;
        const acc_t* Wb = Wa + l0 * D;
        const scalar_t* go_raw = grad_ctx.data_ptr<scalar_t>() + (b * L + l0) * Dv;
        const scalar_t* cx = ctx.data_ptr<scalar_t>() + (b * L + l0) * Dv;
        const acc_t* go = reinterpret_cast<const acc_t*>(go_raw);
        if (!std::is_same_v<scalar_t, acc_t>) {
          for (int64_t i = 0; i < lb * Dv; ++i) gbuf[i] = static_cast<acc_t>(go_raw[i]);
          go = gbuf;
        }
        const bool whole = np <= tile;  // one tile: delta is made from it, ctx is not read
        for (int64_t i = 0; i < lb; ++i) {
          if (!whole) delta[i] = dot(go + i * Dv, cx + i * Dv, Dv);
          lse_b[i] = static_cast<acc_t>(lse.data_ptr<float>()[b * L + l0 + i]);
        }
        for (int64_t t0 = 0; t0 < np; t0 += tile) {
          const int64_t n = std::min(tile, np - t0), real = std::min(n, nr - t0), c = plan.cols(n, real);
          T::gemm(plan.small, lb, c, D, Wb, D, 1, hT + t0, np, pp, c, false);   // scores
          T::gemm(plan.small, lb, c, Dv, go, Dv, 1, vT + t0, np, ds, c, false);  // dP = grad_ctx . u_n
          exp_grad(plan, pp, ds, lb, c, real, lse_b, delta, whole);             // P = exp(S - lse), dS
          if (plan.small) {  // P^T and dS^T read in place
            T::gemm(true, c, Dv, lb, pp, 1, c, go, Dv, gv + t0 * Dv, Dv, true);  // grad_v += P^T grad_ctx
            T::gemm(true, c, D, lb, ds, 1, c, Wb, D, gh + t0 * D, D, true);      // grad_h += dS^T W
          } else {
            transpose_pair(pp, ds, pT, dsT, lb, c);
            T::gemm(false, c, Dv, lb, pT, lb, 1, go, Dv, gv + t0 * Dv, Dv, true);
            T::gemm(false, c, D, lb, dsT, lb, 1, Wb, D, gh + t0 * D, D, true);
          }
          T::gemm(plan.small, lb, D, c, ds, c, 1, hc + t0 * D, D, gW + l0 * D, D, true);  // grad_W += dS h
        }
      }
      flush();
    }
  });

  // rows cut between thread ranges: partial sums added in range order
  std::vector<CutRow> row_sum(B);
  for (auto& rows : cut_rows)
    for (auto& r : rows) {
      CutRow& s = row_sum[r.b];
      if (!s.gh.defined()) {
        s = r;
      } else {
        s.gh.add_(r.gh);
        if (has_v) s.gv.add_(r.gv);
      }
    }
  for (int64_t b = 0; b < B; ++b) {
    if (!row_sum[b].gh.defined()) continue;
    scatter_real<scalar_t>(grad_h, rt, b, row_sum[b].gh.template data_ptr<acc_t>());
    if (has_v) scatter_real<scalar_t>(grad_v, rt, b, row_sum[b].gv.template data_ptr<acc_t>());
  }
  for (int64_t p = 1; p < plan.parts; ++p) gW_parts[0].add_(gW_parts[p]);
  if (!std::is_same_v<scalar_t, acc_t>) grad_W.copy_(gW_parts[0]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_backward_cpu(
    const at::Tensor& grad_ctx_in, const at::Tensor& h_in, const at::Tensor& mask_in, const at::Tensor& W_in,
    const std::optional<at::Tensor>& v_in, const at::Tensor& ctx_in, const at::Tensor& lse_in) {
  xmcnas_fast::checks::label_attention_inputs(h_in, mask_in, W_in, v_in);
  xmcnas_fast::checks::label_attention_saved(h_in, W_in, v_in, grad_ctx_in, ctx_in, lse_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_ctx = grad_ctx_in.contiguous(), h = h_in.contiguous(), mask = mask_in.contiguous(),
                   W = W_in.contiguous(), ctx = ctx_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor v = v_in ? v_in->contiguous() : at::Tensor();
  at::Tensor grad_h = at::zeros_like(h);
  at::Tensor grad_W = at::empty_like(W);
  at::Tensor grad_v = v.defined() ? at::zeros_like(v) : at::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_backward", [&] {
    backward_impl<scalar_t>(grad_ctx, h, mask, W, v, ctx, lse, grad_h, grad_W, grad_v);
  });
  return {grad_h, grad_W, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("label_attention", &label_attention_cpu);
  m.impl("label_attention_backward", &label_attention_backward_cpu);
}
