// Label-wise attention on the CPU, forward and backward, without the [B,L,N]
// score tensor. The values are h itself, or a separate v [B,N,Dv] with h's
// padding (a model folds the first linear layer after the attention into v:
// the attention weights of a row sum to 1, so Linear(ctx) = P (h A^T + b)).
// label_attention_score is the forward followed by the head's ReLU-dot out of
// training: the context stays in a per-thread tile, only [B,L] is written.
//
// Padding tokens are dropped before any arithmetic: the real tokens of a row
// are gathered (and widened to the accumulation type) into a compact block.
// The work is cut into tasks (unit, label block), and goes one of two ways.
//
// The packed path (float32 arithmetic on AVX-512, every row at most kShortRow
// real tokens, D and Dv at most kShortWidth: short texts). A unit is several
// consecutive batch rows, their real tokens stacked (at most kPackTokens), and
// the scores are laid out transposed, S^T [tokens, labels], the labels along
// the vector lanes: no lane is wasted on padding however short the rows, the
// softmax over a row's tokens is element-wise across its rows of S^T, and the
// products whose weight is shared by the rows (the scores H W^T, grad_h +=
// dS^T W, grad_W += dS H) run once for the whole unit. The products are
// avx512.h's register-tiled GEMM, which reads a transposed operand in place;
// W^T is laid out once per call in panels of kPanel labels, each contiguous.
//
// The tiled path (longer rows, wider states, float64, CPUs without AVX-512):
// a unit is one row; a task computes its scores one token tile at a time into
// a small per-thread scratch, with an online softmax across tiles (one tile
// when a row has at most kTokenTile real tokens, the usual case), and the
// backward recomputes them from the saved log-sum-exp. A label block holds
// about kTileElems scores: 128 labels at 256 tokens. float32 tiles go to
// oneDNN's batch-reduce GEMM micro-kernel through ATen (cpublas::brgemm,
// JIT-compiled for the running CPU; it caches one kernel per shape, so rows
// are padded with zeros to a multiple of kTokenQuantum tokens), or ATen's
// BLAS; float64 (kept for gradcheck) goes through at::mm, with std::exp. On
// AVX-512 the exponentials are avx512.h's vectorized exp.
//
// Either way, scratch is allocated once per thread and call; nothing inside
// the loops over tasks and tiles allocates or goes through ATen's dispatcher.
// Accumulation is float32 for float32, bfloat16 and float16, float64 for
// float64. The [B,L,Dv] output comes from output_buffers.h (recycled, huge
// pages).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
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
#include "label_attention_plan.h"

namespace {

using namespace xmcnas_fast::cpu::attention;


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

// The products of the general path, for the accumulation type: oneDNN's, BLAS or at::mm.
template <typename acc_t>
struct Tiles;

template <>
struct Tiles<double> {
  static void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t sam, int64_t sak, const double* B,
                   int64_t ldb, double* C, int64_t ldc, bool add) {
    gemm_aten(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
  }
};

template <>
struct Tiles<float> {
  static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool add) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if (sak == 1 && M > 0 && N > 0 && K > 0) {
      at::native::cpublas::brgemm(M, N, K, sam, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
      return;
    }
#endif
    gemm_aten(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
  }
};


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

// The score of each of `rows` context rows c [rows, Dv] (times inv[i] when inv is not null):
// score[i] = sum_d w[d] relu(c[i,d] inv[i]) (label_attention_score's epilogue).
template <typename acc_t, typename scalar_t>
void score_rows(const acc_t* c, int64_t rows, int64_t Dv, const acc_t* inv, const acc_t* w, scalar_t* score) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* ci = c + i * Dv;
    const acc_t k = inv == nullptr ? acc_t(1) : inv[i];
    acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= Dv; d += 8)
      for (int j = 0; j < 8; ++j) s[j] += w[d + j] * std::max(ci[d + j] * k, acc_t(0));
    for (; d < Dv; ++d) s[0] += w[d] * std::max(ci[d] * k, acc_t(0));
    score[i] = static_cast<scalar_t>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
  }
}

// What a forward pass writes: the context ctx [B,L,Dv] and lse [B,L], or (label_attention_score)
// only the scores [B,L] of the context through w [Dv] (any may be null: not wanted).
template <typename scalar_t, typename acc_t>
struct ForwardOut {
  scalar_t* ctx = nullptr;
  float* lse = nullptr;
  scalar_t* score = nullptr;
  const acc_t* w = nullptr;  // w in the accumulation type, with score

  // Labels l0 .. l0 + lb of a row b with no real token: zero context (and score), lse = +inf.
  void empty_row(int64_t b, int64_t l0, int64_t lb, int64_t L, int64_t Dv) const {
    if (ctx != nullptr) std::fill(ctx + (b * L + l0) * Dv, ctx + (b * L + l0 + lb) * Dv, scalar_t(0));
    if (lse != nullptr) std::fill(lse + b * L + l0, lse + b * L + l0 + lb, std::numeric_limits<float>::infinity());
    if (score != nullptr) std::fill(score + b * L + l0, score + b * L + l0 + lb, scalar_t(0));
  }
};

#if XMCNAS_HAS_AVX512_CODE
template <typename scalar_t>
void forward_packed(const Plan& plan, const at::Tensor& h, const at::Tensor& v, const ForwardOut<scalar_t, float>& o) {
  const int64_t Dv = v.defined() ? v.size(2) : plan.D, L = plan.L;
  // the context tile goes to scratch unless it is ctx itself (float32, no scores)
  const bool direct = o.score == nullptr && std::is_same_v<scalar_t, float>;
  packed_forward_tiles<scalar_t>(
      plan, h, v,
      [&](int64_t b, int64_t l0) { return direct ? reinterpret_cast<float*>(o.ctx + (b * L + l0) * Dv) : nullptr; },
      [&](int64_t b, int64_t l0) { return o.lse == nullptr ? nullptr : o.lse + b * L + l0; },
      [&] {
        return [&](int64_t b, int64_t l0, int64_t lb, const float* c) {
          if (o.score != nullptr) {
            score_rows(c, lb, Dv, static_cast<const float*>(nullptr), o.w, o.score + b * L + l0);
          } else if (!direct) {
            scalar_t* out = o.ctx + (b * L + l0) * Dv;
            for (int64_t i = 0; i < lb * Dv; ++i) out[i] = static_cast<scalar_t>(c[i]);
          }
        };
      },
      [&](int64_t b, int64_t l0, int64_t lb) { o.empty_row(b, l0, lb, L, Dv); });
}
#endif

// v: the values [B,N,Dv], or undefined for h itself (Dv = D).
template <typename scalar_t>
void forward_impl(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, const at::Tensor& v,
                  const ForwardOut<scalar_t, acc_type<scalar_t>>& o) {
  using acc_t = acc_type<scalar_t>;
  using T = Tiles<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const bool has_v = v.defined();
  const Plan plan(h, mask, W, has_v ? v.size(2) : h.size(2), acc_dtype);
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (plan.packed) return forward_packed<scalar_t>(plan, h, v, o);
  }
#endif
  const int64_t D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, lbk = plan.lb, nlb = plan.nlb,
                np_max = plan.np_max, tile = plan.tile;
  const RealTokens& rt = plan.rt;
  const acc_t* Wa = plan.Wa.data_ptr<acc_t>();

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    // per thread, once per call: hc, hT [Np, D], the values [Np, Dv], the score tile, the accumulator
    std::vector<acc_t> buf(2 * np_max * D + (has_v ? np_max * Dv : 0) + lbk * tile + lbk * Dv + 4 * lbk);
    acc_t* const hc = buf.data();
    acc_t* const hT = hc + np_max * D;
    acc_t* const vc = has_v ? hT + np_max * D : hc;  // the values, [Np, Dv]
    acc_t* const s = hT + np_max * D + (has_v ? np_max * Dv : 0);
    acc_t* const abuf = s + lbk * tile;
    acc_t* const mx = abuf + lbk * Dv;
    acc_t* const sum = mx + lbk;
    acc_t* const scale = sum + lbk;
    acc_t* const inv = scale + lbk;
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
        if (nr == 0) {
          o.empty_row(b, l0, lb, L, Dv);
          continue;
        }
        scalar_t* out = o.ctx == nullptr ? nullptr : o.ctx + (b * L + l0) * Dv;
        float* lse_out = o.lse == nullptr ? nullptr : o.lse + b * L + l0;
        const acc_t* Wb = Wa + l0 * D;
        // float32 / float64 accumulate straight into ctx
        acc_t* acc = std::is_same_v<scalar_t, acc_t> && out != nullptr ? reinterpret_cast<acc_t*>(out) : abuf;
        std::fill(mx, mx + lb, -std::numeric_limits<acc_t>::infinity());
        std::fill(sum, sum + lb, acc_t(0));
        for (int64_t t0 = 0; t0 < np; t0 += tile) {
          const int64_t n = std::min(tile, np - t0), real = std::min(n, nr - t0);
          T::gemm(lb, n, D, Wb, D, 1, hT + t0, np, s, n, false);  // scores of this tile
          online_softmax(plan, s, lb, n, real, mx, sum, scale);
          if (t0 > 0)
            for (int64_t i = 0; i < lb; ++i)
              for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= scale[i];
          T::gemm(lb, Dv, n, s, n, 1, vc + t0 * Dv, Dv, acc, Dv, t0 > 0);
        }
        for (int64_t i = 0; i < lb; ++i) {
          inv[i] = acc_t(1) / sum[i];
          if (lse_out != nullptr) lse_out[i] = static_cast<float>(mx[i] + std::log(sum[i]));
        }
        if (o.score != nullptr) {
          score_rows(acc, lb, Dv, inv, o.w, o.score + b * L + l0);
        } else {
          for (int64_t i = 0; i < lb; ++i)
            for (int64_t d = 0; d < Dv; ++d) out[i * Dv + d] = static_cast<scalar_t>(acc[i * Dv + d] * inv[i]);
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
    ForwardOut<scalar_t, acc_type<scalar_t>> o;
    o.ctx = ctx.data_ptr<scalar_t>();
    o.lse = lse.data_ptr<float>();
    forward_impl<scalar_t>(h, mask, W, v, o);
  });
  return {ctx, lse};
}

// label_attention followed by relu_dropout_dot out of training, in one pass that writes only the
// scores [B,L]: score[b,l] = sum_d w[d] relu(ctx[b,l,d]). The context stays in a per-thread tile.
at::Tensor label_attention_score_cpu(const at::Tensor& h_in, const at::Tensor& mask_in, const at::Tensor& W_in,
                                     const std::optional<at::Tensor>& v_in, const at::Tensor& w_in) {
  xmcnas_fast::checks::label_attention_inputs(h_in, mask_in, W_in, v_in);
  const int64_t Dv = v_in ? v_in->size(2) : h_in.size(2);
  xmcnas_fast::checks::head_weights("label_attention_score", h_in, w_in, Dv);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor h = h_in.contiguous(), mask = mask_in.contiguous(), W = W_in.contiguous();
  const at::Tensor v = v_in ? v_in->contiguous() : at::Tensor();
  at::Tensor score = at::empty({h.size(0), W.size(0)}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_score", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor w = w_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    ForwardOut<scalar_t, acc_t> o;
    o.score = score.data_ptr<scalar_t>();
    o.w = w.data_ptr<acc_t>();
    forward_impl<scalar_t>(h, mask, W, v, o);
  });
  return score;
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

#if XMCNAS_HAS_AVX512_CODE
// The packed backward of the tasks [first, last) (see forward_packed): per unit and label block,
// S^T = H W^T for the unit's stacked tokens at once; per batch row, dP = grad_ctx V^T [lb, nr],
// transposed into dP^T, P^T and dS^T element-wise, grad_v += P^T grad_ctx; then for the whole unit
// grad_h += dS^T W and grad_W += dS H, the stacked tokens of several rows in one product.
template <typename scalar_t>
void backward_packed_range(const Plan& plan, int64_t first, int64_t last, const at::Tensor& grad_ctx,
                           const at::Tensor& h, const at::Tensor& v, const at::Tensor& lse, float* gW,
                           at::Tensor& grad_h, at::Tensor& grad_v, std::vector<CutRow>& cut) {
  using xmcnas_fast::cpu::gemm_avx512;
  const bool has_v = v.defined();
  const int64_t D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, lbk = plan.lb, nlb = plan.nlb,
                R_max = plan.max_group_tokens, np_max = plan.np_max;
  const float* Wa = plan.Wa.data_ptr<float>();
  const float* lse_all = lse.data_ptr<float>();
  // per thread: the unit's tokens hs [R, D], values vs [R, Dv] and their transpose vT [Dv, R]; S^T and
  // dP^T [R, lb]; dP [lb, Np]; the gradients gh [R, D], gv [R, Dv]; grad_ctx widened [lb, Dv]
  std::vector<float> buf(2 * R_max * D + (has_v ? 3 * R_max * Dv : R_max * D) + 2 * R_max * lbk + lbk * np_max +
                         (std::is_same_v<scalar_t, float> ? 0 : lbk * Dv));
  std::vector<int64_t> row0(plan.max_group_rows);
  float* const hs = buf.data();
  float* const gh = hs + R_max * D;
  float* const vs = has_v ? gh + R_max * D : hs;
  float* const gv = has_v ? vs + R_max * Dv : gh;
  float* const vT = (has_v ? gv + R_max * Dv : gh + R_max * D);
  float* const st = vT + R_max * Dv;
  float* const dpt = st + R_max * lbk;
  float* const dp = dpt + R_max * lbk;
  float* const gbuf = dp + lbk * np_max;
  int64_t cur_u = -1, R = 0;
  auto leave = [&] {
    if (cur_u >= 0) leave_unit<scalar_t>(plan, cur_u, first, last, row0.data(), gh, gv, Dv, has_v, grad_h, grad_v, cut);
  };
  for (int64_t task = first; task < last; ++task) {
    const int64_t u = task / nlb, l0 = (task % nlb) * lbk, lb = std::min(lbk, L - l0);
    if (u != cur_u) {
      leave();
      cur_u = u;
      R = gather_unit<scalar_t>(plan, u, h, hs, row0.data());
      if (has_v) gather_unit<scalar_t>(plan, u, v, vs, row0.data());
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < Dv; ++d) vT[d * R + r] = vs[r * Dv + d];
      std::fill(gh, gh + R * D, 0.0f);
      if (has_v) std::fill(gv, gv + R * Dv, 0.0f);
    }
    if (R == 0) continue;
    scores_t(plan, hs, R, l0, lb, st);  // S^T = H W^T
    for (int64_t b = plan.group[u]; b < plan.group[u + 1]; ++b) {
      const int64_t nr = plan.rt.count(b), r0 = row0[b - plan.group[u]];
      if (nr == 0) continue;
      const scalar_t* go_raw = grad_ctx.data_ptr<scalar_t>() + (b * L + l0) * Dv;
      const float* go = reinterpret_cast<const float*>(go_raw);
      if constexpr (!std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < lb * Dv; ++i) gbuf[i] = static_cast<float>(go_raw[i]);
        go = gbuf;
      }
      gemm_avx512(lb, nr, Dv, go, Dv, 1, vT + r0, R, dp, nr, false);  // dP = grad_ctx V^T
      for (int64_t n = 0; n < nr; ++n)                                  // dP^T
        for (int64_t l = 0; l < lb; ++l) dpt[(r0 + n) * lb + l] = dp[l * nr + n];
      exp_grad_columns(st + r0 * lb, dpt + r0 * lb, nr, lb, lse_all + b * L + l0);
      gemm_avx512(nr, Dv, lb, st + r0 * lb, lb, 1, go, Dv, gv + r0 * Dv, Dv, true);  // grad_v += P^T grad_ctx
    }
    gemm_avx512(R, D, lb, dpt, lb, 1, Wa + l0 * D, D, gh, D, true);  // grad_h += dS^T W
    gemm_avx512(lb, D, R, dpt, 1, lb, hs, D, gW + l0 * D, D, true);  // grad_W += dS H
  }
  leave();
}
#endif

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
  std::vector<std::vector<CutRow>> cut_rows(plan.parts);

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* const gW = gW_parts[p].template data_ptr<acc_t>();
      std::fill(gW, gW + L * D, acc_t(0));
#if XMCNAS_HAS_AVX512_CODE
      if constexpr (std::is_same_v<acc_t, float>) {
        if (plan.packed) {
          backward_packed_range<scalar_t>(plan, plan.bounds[p], plan.bounds[p + 1], grad_ctx, h, v, lse, gW, grad_h,
                                          grad_v, cut_rows[p]);
          continue;
        }
      }
#endif
      // per range: hc, hT, gh [Np, D] each, then with v: vT, gv [Np, Dv] each; the tiles P and dS
      // [lb, tile] and their transposes; grad_ctx widened [lb, Dv]; delta and lse [lb]
      std::vector<acc_t> buf(3 * np_max * D + (has_v ? 2 * np_max * Dv : 0) + 4 * lbk * tile + lbk * Dv + 2 * lbk);
      acc_t* const hc = buf.data();
      acc_t* const hT = hc + np_max * D;
      acc_t* const gh = hT + np_max * D;                          // grad of the current row's real tokens, [Np, D]
      acc_t* const vT = has_v ? gh + np_max * D : hT;             // the values transposed, [Dv, Np]
      acc_t* const gv = has_v ? vT + np_max * Dv : gh;            // grad of the values, [Np, Dv]
      acc_t* const pp = gh + np_max * D + (has_v ? 2 * np_max * Dv : 0);  // [lb, tile]: P
      acc_t* const ds = pp + lbk * tile;                          // [lb, tile]: dP, then dS
      acc_t* const pT = ds + lbk * tile;                          // [tile, lb]
      acc_t* const dsT = pT + lbk * tile;                         // [tile, lb]
      acc_t* const gbuf = dsT + lbk * tile;
      acc_t* const delta = gbuf + lbk * Dv;
      acc_t* const lse_b = delta + lbk;
      const int64_t first = plan.bounds[p], last = plan.bounds[p + 1];
      int64_t cur_b = -1;
      auto flush = [&] {
        if (cur_b < 0) return;
        const bool whole = cur_b * nlb >= first && (cur_b + 1) * nlb <= last;  // the whole row is ours
        leave_row<scalar_t>(rt, cur_b, whole, gh, gv, D, Dv, has_v, grad_h, grad_v, cut_rows[p]);
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
          const int64_t n = std::min(tile, np - t0), real = std::min(n, nr - t0);
          T::gemm(lb, n, D, Wb, D, 1, hT + t0, np, pp, n, false);   // scores
          T::gemm(lb, n, Dv, go, Dv, 1, vT + t0, np, ds, n, false);  // dP = grad_ctx . u_n
          exp_grad(plan, pp, ds, lb, n, real, lse_b, delta, whole);  // P = exp(S - lse), dS
          transpose_pair(pp, ds, pT, dsT, lb, n);
          T::gemm(n, Dv, lb, pT, lb, 1, go, Dv, gv + t0 * Dv, Dv, true);  // grad_v += P^T grad_ctx
          T::gemm(n, D, lb, dsT, lb, 1, Wb, D, gh + t0 * D, D, true);     // grad_h += dS^T W
          T::gemm(lb, D, n, ds, n, 1, hc + t0 * D, D, gW + l0 * D, D, true);  // grad_W += dS h
        }
      }
      flush();
    }
  });

  add_cut_rows<scalar_t, acc_t>(cut_rows, rt, B, has_v, grad_h, grad_v);
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
  m.impl("label_attention_score", &label_attention_score_cpu);
}
