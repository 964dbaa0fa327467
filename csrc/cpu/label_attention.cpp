// Label-wise attention on the CPU, forward and backward, without the [B,L,N]
// score tensor. The values are h itself, or a separate v [B,N,Dv] with h's
// padding (a model folds the first linear layer after the attention into v:
// the attention weights of a row sum to 1, so Linear(ctx) = P (h A^T + b)).
//
// The work is cut into tasks (b, label block): a block of kLabelBlock labels
// attends over the real tokens of batch row b. A task computes its scores one
// token tile at a time into a small per-thread scratch, with an online softmax
// across tiles (one tile when a row has at most kTokenTile real tokens, the
// usual case), and the backward recomputes them from the saved log-sum-exp.
// Padding tokens are dropped before any arithmetic: the real tokens of a row
// are gathered (and widened to float32) into a compact block, so padding
// anywhere in a row costs nothing.
//
// The products are GEMM tiles of a few hundred on each side. float32 tiles go
// to oneDNN's batch-reduce GEMM micro-kernel through ATen (cpublas::brgemm:
// JIT-compiled for the running CPU, AVX-512 where there is one; measured 2.4x
// the per-core throughput of MKL's sgemm on the AMD EPYC this was tuned on,
// where MKL takes its AVX2 path). It runs on the calling thread, so threads
// are not oversubscribed; without oneDNN, ATen falls back to its BLAS. It
// caches one kernel per shape: rows are padded with zeros to a multiple of
// kTokenQuantum tokens so that only a few shapes ever occur. float64 (kept
// for gradcheck) goes through at::mm. Accumulation is float32 for float32,
// bfloat16 and float16, float64 for float64.
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

namespace {

constexpr int64_t kLabelBlock = 128;   // labels per task
constexpr int64_t kTokenTile = 256;    // tokens per score tile (a multiple of kTokenQuantum)
constexpr int64_t kTokenQuantum = 16;  // rows are padded to a multiple of this many tokens

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// C[M,N] = A[M,K] B[K,N] (+ C if add), row-major with leading dimensions.
template <typename T>
void gemm_aten(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool add) {
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (add)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
          double* C, int64_t ldc, bool add) {
  gemm_aten(M, N, K, A, lda, B, ldb, C, ldc, add);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool add) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (M > 0 && N > 0 && K > 0) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
    return;
  }
#endif
  gemm_aten(M, N, K, A, lda, B, ldb, C, ldc, add);
}

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

// Task boundaries (parts+1 entries) splitting the tasks into `parts`
// consecutive ranges of about equal cost.
std::vector<int64_t> balanced_split(const std::vector<double>& cost, int64_t parts) {
  const int64_t n = static_cast<int64_t>(cost.size());
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds{0};
  double acc = 0;
  int64_t i = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    while (i < n && acc + cost[i] / 2 < target) acc += cost[i++];
    bounds.push_back(i);
  }
  bounds.push_back(n);
  return bounds;
}

// What forward and backward share: the shapes, the real tokens, W in the
// accumulation type, and the split of the tasks over threads. Tasks are
// (b, label block) in b-major order; the cost of one is its padded tokens
// times its labels, plus a little for the fixed work on empty rows.
struct Plan {
  int64_t B, N, D, L, nlb, parts;
  RealTokens rt;
  at::Tensor Wa;
  std::vector<int64_t> bounds;  // thread range p covers tasks [bounds[p], bounds[p+1])

  Plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, at::ScalarType acc_dtype)
      : B(h.size(0)), N(h.size(1)), D(h.size(2)), L(W.size(0)),
        nlb((L + kLabelBlock - 1) / kLabelBlock), rt(mask), Wa(W.to(acc_dtype)) {  // W.to: no-op for f32/f64
    std::vector<double> cost;
    cost.reserve(B * nlb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nlb; ++j)
        cost.push_back(static_cast<double>(rt.padded(b) + 8) *
                       static_cast<double>(std::min(kLabelBlock, L - j * kLabelBlock)));
    const int64_t tasks = B * nlb;
    bounds = balanced_split(cost, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
    parts = static_cast<int64_t>(bounds.size()) - 1;
  }
  int64_t padded_max() const {
    int64_t m = 0;
    for (int64_t b = 0; b < B; ++b) m = std::max(m, rt.padded(b));
    return m;
  }
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

template <typename acc_t>
acc_t row_sum(const acc_t* a, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k];
  for (; i < n; ++i) s[0] += a[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t>
acc_t row_max(const acc_t* a, int64_t n, acc_t init) {
  acc_t s[8] = {init, init, init, init, init, init, init, init};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] = std::max(s[k], a[i + k]);
  for (; i < n; ++i) s[0] = std::max(s[0], a[i]);
  return std::max(std::max(std::max(s[0], s[1]), std::max(s[2], s[3])),
                  std::max(std::max(s[4], s[5]), std::max(s[6], s[7])));
}

// S[i, j] <- exp(S[i, j] - sub[i]) for the first `real` columns, 0 for the
// padding columns after them. The exponentials are ATen's (vectorized for
// the running CPU), on the whole tile at once.
template <typename acc_t>
void exp_rows(at::Tensor& S, const acc_t* sub, int64_t real) {
  const int64_t rows = S.size(0), n = S.size(1);
  acc_t* s = S.data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * n;
    for (int64_t j = 0; j < real; ++j) row[j] -= sub[i];
    std::fill(row + real, row + n, -std::numeric_limits<acc_t>::infinity());
  }
  S.exp_();
}

// dS = P * (dP - delta) (in place of dP, [rows, n]) and the transposes P^T,
// dS^T ([n, rows]) that the grad_h products take, in blocks of 16 rows that
// stay in L1 (a transposing pass over whole rows is several times slower).
template <typename acc_t>
void grad_scores(const acc_t* P, acc_t* dS, acc_t* PT, acc_t* dST, const acc_t* delta, int64_t rows, int64_t n) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < n; ++j) dS[i * n + j] = P[i * n + j] * (dS[i * n + j] - delta[i]);
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
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Plan plan(h, mask, W, acc_dtype);
  const bool has_v = v.defined();
  const int64_t D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, nlb = plan.nlb, np_max = plan.padded_max();
  const RealTokens& rt = plan.rt;
  const acc_t* Wa = plan.Wa.data_ptr<acc_t>();

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    const auto opt = h.options().dtype(acc_dtype);
    at::Tensor hbuf = at::empty({2 * np_max * D + (has_v ? np_max * Dv : 0)}, opt);
    at::Tensor sbuf = at::empty({kLabelBlock * kTokenTile}, opt);
    at::Tensor abuf = at::empty({kLabelBlock * Dv}, opt);
    acc_t* const hc = hbuf.data_ptr<acc_t>();
    acc_t* const hT = hc + np_max * D;
    acc_t* const vc = has_v ? hT + np_max * D : hc;  // the values, [Np, Dv]
    std::vector<acc_t> mx(kLabelBlock), sum(kLabelBlock), scale(kLabelBlock);
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cur_b = -1;
      for (int64_t task = plan.bounds[p]; task < plan.bounds[p + 1]; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * kLabelBlock;
        const int64_t lb = std::min(kLabelBlock, L - l0), nr = rt.count(b), np = rt.padded(b);
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
        acc_t* acc = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out) : abuf.data_ptr<acc_t>();
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t t0 = 0; t0 < np; t0 += kTokenTile) {
          const int64_t n = std::min(kTokenTile, np - t0), real = std::min(n, nr - t0);
          at::Tensor S = sbuf.narrow(0, 0, lb * n).view({lb, n});
          acc_t* s = S.data_ptr<acc_t>();
          gemm(lb, n, D, Wb, D, hT + t0, np, s, n, false);  // scores of this tile
          // online softmax: new row maxima, rescale of what the earlier tiles summed
          for (int64_t i = 0; i < lb; ++i) {
            const acc_t m = row_max(s + i * n, real, mx[i]);
            scale[i] = std::exp(mx[i] - m);  // 0 on the first tile
            mx[i] = m;
          }
          exp_rows(S, mx.data(), real);
          for (int64_t i = 0; i < lb; ++i) sum[i] = sum[i] * scale[i] + row_sum(s + i * n, n);
          if (t0 > 0)
            for (int64_t i = 0; i < lb; ++i)
              for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= scale[i];
          gemm(lb, Dv, n, s, n, vc + t0 * Dv, Dv, acc, Dv, t0 > 0);
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
  at::Tensor ctx = at::empty({B, L, Dv}, h.options());
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
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Plan plan(h, mask, W, acc_dtype);
  const bool has_v = v.defined();
  const int64_t B = plan.B, D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, nlb = plan.nlb,
                np_max = plan.padded_max();
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
  // per-thread buffer: hc, hT, gh [Np, D] each, then with v: vT, gv [Np, Dv] each
  const int64_t gh_at = 2 * np_max * D, gv_at = 3 * np_max * D + np_max * Dv;

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    at::Tensor hbuf = at::empty({3 * np_max * D + (has_v ? 2 * np_max * Dv : 0)}, opt);
    at::Tensor tbuf = at::empty({4 * kLabelBlock * kTokenTile}, opt);
    at::Tensor gbuf = at::empty({kLabelBlock * Dv}, opt);
    acc_t* const hc = hbuf.data_ptr<acc_t>();
    acc_t* const hT = hc + np_max * D;
    acc_t* const gh = hc + gh_at;                        // grad of the current row's real tokens, [Np, D]
    acc_t* const vT = has_v ? gh + np_max * D : hT;      // the values transposed, [Dv, Np]
    acc_t* const gv = has_v ? hc + gv_at : gh;           // grad of the values, [Np, Dv]
    std::vector<acc_t> delta(kLabelBlock), lse_b(kLabelBlock);
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
          cut_rows[p].push_back({cur_b, hbuf.narrow(0, gh_at, nr * D).clone(),
                                 has_v ? hbuf.narrow(0, gv_at, nr * Dv).clone() : at::Tensor()});
        }
      };
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * kLabelBlock;
        const int64_t lb = std::min(kLabelBlock, L - l0), nr = rt.count(b), np = rt.padded(b);
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
          acc_t* g = gbuf.data_ptr<acc_t>();
          for (int64_t i = 0; i < lb * Dv; ++i) g[i] = static_cast<acc_t>(go_raw[i]);
          go = g;
        }
        for (int64_t i = 0; i < lb; ++i) {
          delta[i] = dot(go + i * Dv, cx + i * Dv, Dv);
          lse_b[i] = static_cast<acc_t>(lse.data_ptr<float>()[b * L + l0 + i]);
        }
        for (int64_t t0 = 0; t0 < np; t0 += kTokenTile) {
          const int64_t n = std::min(kTokenTile, np - t0), real = std::min(n, nr - t0);
          at::Tensor P = tbuf.narrow(0, 0, lb * n).view({lb, n});
          acc_t* pp = P.data_ptr<acc_t>();
          acc_t* ds = pp + lb * n;   // [lb, n]: dP, then dS
          acc_t* pT = ds + lb * n;   // [n, lb]: P transposed
          acc_t* dsT = pT + lb * n;  // [n, lb]: dS transposed
          gemm(lb, n, D, Wb, D, hT + t0, np, pp, n, false);   // scores
          gemm(lb, n, Dv, go, Dv, vT + t0, np, ds, n, false);  // dP = grad_ctx . u_n
          exp_rows(P, lse_b.data(), real);                     // P = exp(S - lse), 0 on padding
          grad_scores(pp, ds, pT, dsT, delta.data(), lb, n);
          gemm(n, Dv, lb, pT, lb, go, Dv, gv + t0 * Dv, Dv, true);  // grad_v += P^T grad_ctx
          gemm(n, D, lb, dsT, lb, Wb, D, gh + t0 * D, D, true);     // grad_h += dS^T W
          gemm(lb, D, n, ds, n, hc + t0 * D, D, gW + l0 * D, D, true);  // grad_W += dS h
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
