// label_attention over each document's own shortlist of labels, on the CPU,
// forward and backward: ctx[b,k] = sum_n softmax_n(W[l].h[b,n] | mask) v[b,n]
// with l = labels[b,k] (-1: a padding slot, zero context, no gradient).
//
// The work is cut into tasks (b, block of slots): the real tokens of row b
// are gathered (and widened to the accumulation type) into a compact block
// once per row, the W rows of the block's real slots are gathered beside
// them, and the block's whole score rows [slots, real tokens] live in a
// per-thread scratch: a block holds about kTileElems scores, so a row of any
// length fits (one slot a block past kTileElems tokens) and the softmax is
// exact, with no online rescaling. The backward recomputes the weights from
// the saved log-sum-exp. grad_rows [B,K,D] gets the gradient of each slot's
// W row, written once by the task that owns the slot: no two threads touch
// one row, and W's [L,D] gradient is never made here (ops.py sums the rows
// into it, dense or sparse).
//
// Products: avx512.h's register-tiled GEMM for float32 (and the 16-bit types,
// which accumulate in float32) on a CPU with AVX-512, with its vectorized exp;
// elsewhere (float64, kept for gradcheck; other CPUs; XMCNAS_CPU_ISA=generic)
// a plain loop nest that the compiler vectorizes for the baseline ISA.
// Nothing inside the loops over tasks allocates or goes through ATen's
// dispatcher; the scratch is allocated once per thread and call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "avx512.h"
#include "output_buffers.h"
#include "task_split.h"

namespace {

using xmcnas_fast::cpu::balanced_split;
using xmcnas_fast::cpu::has_avx512;

constexpr int64_t kTileElems = 32 * 1024;  // scores per task (slots x real tokens), about
constexpr int64_t kMaxSlots = 512;         // the most slots per task

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// C[M,N] = A[M,K] B[K,N] (+ C if add); A(i, k) = A[i sam + k sak], B and C row-major.
template <typename T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!add) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * sam + k * sak];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T>
void gemm(bool vec, int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
          T* C, int64_t ldc, bool add) {
  if (M == 0 || N == 0) return;
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<T, float>) {
    if (vec) return xmcnas_fast::cpu::gemm_avx512(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
  }
#endif
  gemm_portable(M, N, K, A, sam, sak, B, ldb, C, ldc, add);
}

// Softmax pieces on `rows` score rows of n columns (ld n).
//   softmax_rows: S <- exp(S - max); sum[i] = the row's sum, lse[i] = max + log(sum).
//   exp_grad: P <- exp(S - lse[i]); delta = sum_j P dP; dS <- P (dP - delta).
template <typename acc_t>
void softmax_rows_portable(acc_t* s, int64_t rows, int64_t n, acc_t* sum, acc_t* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* r = s + i * n;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, r[j]);
    acc_t t = 0;
    for (int64_t j = 0; j < n; ++j) t += r[j] = std::exp(r[j] - m);
    sum[i] = t;
    lse[i] = m + std::log(t);
  }
}

template <typename acc_t>
void exp_grad_portable(acc_t* p, acc_t* ds, int64_t rows, int64_t n, const acc_t* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* pr = p + i * n;
    acc_t* dr = ds + i * n;
    acc_t delta = 0;
    for (int64_t j = 0; j < n; ++j) {
      pr[j] = std::exp(pr[j] - lse[i]);
      delta += pr[j] * dr[j];
    }
    for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - delta);
  }
}

#if XMCNAS_HAS_AVX512_CODE
XMCNAS_AVX512 void softmax_rows_avx512(float* s, int64_t rows, int64_t n, float* sum, float* lse) {
  using xmcnas_fast::cpu::first_lanes;
  for (int64_t i = 0; i < rows; ++i) {
    float* r = s + i * n;
    __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16) vm = _mm512_mask_max_ps(vm, first_lanes(n - j), vm,
                                                                 _mm512_maskz_loadu_ps(first_lanes(n - j), r + j));
    const float m = _mm512_reduce_max_ps(vm);
    const __m512 sub = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 e = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, r + j), sub));
      _mm512_mask_storeu_ps(r + j, k, e);
      acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    sum[i] = _mm512_reduce_add_ps(acc);
    lse[i] = m + std::log(sum[i]);
  }
}

XMCNAS_AVX512 void exp_grad_avx512(float* p, float* ds, int64_t rows, int64_t n, const float* lse) {
  using xmcnas_fast::cpu::first_lanes;
  for (int64_t i = 0; i < rows; ++i) {
    float* pr = p + i * n;
    float* dr = ds + i * n;
    const __m512 l = _mm512_set1_ps(lse[i]);
    __m512 pd = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 e = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, pr + j), l));
      _mm512_mask_storeu_ps(pr + j, k, e);
      pd = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(k, dr + j), pd);
    }
    const __m512 dl = _mm512_set1_ps(_mm512_reduce_add_ps(pd));
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 e = _mm512_maskz_loadu_ps(k, pr + j);
      _mm512_mask_storeu_ps(dr + j, k, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dr + j), dl)));
    }
  }
}
#endif

template <typename acc_t>
void softmax_rows(bool vec, acc_t* s, int64_t rows, int64_t n, acc_t* sum, acc_t* lse) {
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (vec) return softmax_rows_avx512(s, rows, n, sum, lse);
  }
#endif
  softmax_rows_portable(s, rows, n, sum, lse);
}

template <typename acc_t>
void exp_grad(bool vec, acc_t* p, acc_t* ds, int64_t rows, int64_t n, const acc_t* lse) {
#if XMCNAS_HAS_AVX512_CODE
  if constexpr (std::is_same_v<acc_t, float>) {
    if (vec) return exp_grad_avx512(p, ds, rows, n, lse);
  }
#endif
  exp_grad_portable(p, ds, rows, n, lse);
}

// What forward and backward share: the shapes, the real tokens of each row, the slots per task and
// the split of the tasks (b-major: task = b * nsb + slot block) over threads.
struct Plan {
  int64_t B, N, D, Dv, K, L, sb, nsb, nr_max, parts;
  bool vec;  // float32 accumulation on AVX-512
  std::vector<int64_t> offset{0}, pos;  // the real tokens of row b: pos[offset[b] .. offset[b+1])
  std::vector<int64_t> bounds;          // thread range p covers tasks [bounds[p], bounds[p+1])

  Plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& labels, int64_t L_, int64_t Dv_, bool acc_float)
      : B(h.size(0)), N(h.size(1)), D(h.size(2)), Dv(Dv_), K(labels.size(1)), L(L_) {
    vec = acc_float && has_avx512();
    const bool* m = mask.data_ptr<bool>();
    nr_max = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n)
        if (m[b * N + n]) pos.push_back(n);
      offset.push_back(static_cast<int64_t>(pos.size()));
      nr_max = std::max(nr_max, count(b));
    }
    sb = std::clamp<int64_t>(kTileElems / std::max<int64_t>(nr_max, 1), 1, std::min(kMaxSlots, std::max<int64_t>(K, 1)));
    nsb = (K + sb - 1) / sb;
    std::vector<double> cost;
    cost.reserve(B * nsb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nsb; ++j)
        cost.push_back(static_cast<double>(count(b) + 8) * static_cast<double>(std::min(sb, K - j * sb)));
    const int64_t tasks = B * nsb;
    bounds = balanced_split(cost, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
    parts = static_cast<int64_t>(bounds.size()) - 1;
  }
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
  const int64_t* positions(int64_t b) const { return pos.data() + offset[b]; }
};

// The real tokens of row b of x [B,N,E] widened, as xc [nr, E] and, unless xT is null, xT [E, nr].
template <typename scalar_t, typename acc_t>
void gather_real(const scalar_t* x, const Plan& plan, int64_t b, int64_t E, acc_t* xc, acc_t* xT) {
  const int64_t nr = plan.count(b);
  const scalar_t* src = x + b * plan.N * E;
  const int64_t* pos = plan.positions(b);
  for (int64_t j = 0; j < nr; ++j)
    for (int64_t e = 0; e < E; ++e) xc[j * E + e] = static_cast<acc_t>(src[pos[j] * E + e]);
  if (xT == nullptr) return;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < nr; ++j) xT[e * nr + j] = xc[j * E + e];
}

// Row b of x [B,N,E] <- the compact rows g [nr, E] at its real tokens, zeros at its padding (g may be
// null when the row has no real token). Every row is written once this way: the gradients are
// allocated uninitialised, with no parallel fill before the kernel.
template <typename scalar_t, typename acc_t>
void scatter_real(scalar_t* x, const Plan& plan, int64_t b, int64_t E, const acc_t* g) {
  scalar_t* dst = x + b * plan.N * E;
  const int64_t* pos = plan.positions(b);
  const int64_t nr = plan.count(b);
  for (int64_t n = 0, j = 0; n < plan.N; ++n) {
    scalar_t* row = dst + n * E;
    if (j < nr && pos[j] == n) {
      for (int64_t e = 0; e < E; ++e) row[e] = static_cast<scalar_t>(g[j * E + e]);
      ++j;
    } else {
      std::fill(row, row + E, scalar_t(0));
    }
  }
}

// The real slots of slot block [k0, k0 + n) of row b: their offsets in the block (slot[i]) and their W
// rows widened (Wk [m, D]); returns m.
template <typename scalar_t, typename acc_t>
int64_t gather_rows(const scalar_t* W, const int64_t* labels, const Plan& plan, int64_t b, int64_t k0, int64_t n,
                    int64_t* slot, acc_t* Wk) {
  const int64_t D = plan.D;
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[b * plan.K + k0 + i];
    if (l < 0) continue;
    const scalar_t* w = W + l * D;
    for (int64_t d = 0; d < D; ++d) Wk[m * D + d] = static_cast<acc_t>(w[d]);
    slot[m++] = i;
  }
  return m;
}

void check_label_values(const at::Tensor& labels, int64_t L) {
  const int64_t* p = labels.data_ptr<int64_t>();
  bool bad = false;
  for (int64_t i = 0; i < labels.numel(); ++i) bad |= p[i] < -1 || p[i] >= L;
  xmcnas_fast::checks::label_attention_shortlist_values(bad, L);
}

// v: the values [B,N,Dv], or undefined for h itself (Dv = D).
template <typename scalar_t>
void forward_impl(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, const at::Tensor& labels,
                  const at::Tensor& v, at::Tensor& ctx, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const bool has_v = v.defined();
  const Plan plan(h, mask, labels, W.size(0), has_v ? v.size(2) : h.size(2), std::is_same_v<acc_t, float>);
  const int64_t D = plan.D, Dv = plan.Dv, K = plan.K, sbk = plan.sb, nsb = plan.nsb, nr_max = plan.nr_max;
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const scalar_t* vp = has_v ? v.data_ptr<scalar_t>() : hp;
  const scalar_t* Wp = W.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  scalar_t* out_all = ctx.data_ptr<scalar_t>();
  float* lse_all = lse.data_ptr<float>();

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    // per thread, once per call: hc [nr, D] and hT [D, nr], the values [nr, Dv] (with v), the W rows
    // [sb, D], the scores [sb, nr], the context [sb, Dv], sum and lse [sb]; the slots [sb]
    std::vector<acc_t> buf(2 * nr_max * D + (has_v ? nr_max * Dv : 0) + sbk * D + sbk * nr_max + sbk * Dv + 2 * sbk);
    std::vector<int64_t> slot(sbk);
    acc_t* const hc = buf.data();
    acc_t* const hT = hc + nr_max * D;
    acc_t* const vc = has_v ? hT + nr_max * D : hc;
    acc_t* const Wk = hT + nr_max * D + (has_v ? nr_max * Dv : 0);
    acc_t* const s = Wk + sbk * D;
    acc_t* const cbuf = s + sbk * nr_max;
    acc_t* const sum = cbuf + sbk * Dv;
    acc_t* const lse_k = sum + sbk;
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cur_b = -1;
      for (int64_t task = plan.bounds[p]; task < plan.bounds[p + 1]; ++task) {
        const int64_t b = task / nsb, k0 = (task % nsb) * sbk;
        const int64_t n = std::min(sbk, K - k0), nr = plan.count(b);
        scalar_t* out = out_all + (b * K + k0) * Dv;
        float* lse_out = lse_all + b * K + k0;
        std::fill(out, out + n * Dv, scalar_t(0));  // padding slots and rows without a real token
        std::fill(lse_out, lse_out + n, std::numeric_limits<float>::infinity());
        if (nr == 0) continue;
        if (b != cur_b) {
          gather_real(hp, plan, b, D, hc, hT);
          if (has_v) gather_real(vp, plan, b, Dv, vc, static_cast<acc_t*>(nullptr));
          cur_b = b;
        }
        const int64_t m = gather_rows(Wp, lab, plan, b, k0, n, slot.data(), Wk);
        gemm(plan.vec, m, nr, D, Wk, D, 1, hT, nr, s, nr, false);       // scores [m, nr]
        softmax_rows(plan.vec, s, m, nr, sum, lse_k);
        gemm(plan.vec, m, Dv, nr, s, nr, 1, vc, Dv, cbuf, Dv, false);   // unnormalized context [m, Dv]
        for (int64_t i = 0; i < m; ++i) {
          const acc_t inv = acc_t(1) / sum[i];
          scalar_t* o = out + slot[i] * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(cbuf[i * Dv + d] * inv);
          lse_out[slot[i]] = static_cast<float>(lse_k[i]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> label_attention_shortlist_cpu(const at::Tensor& h_in, const at::Tensor& mask_in,
                                                                 const at::Tensor& W_in, const at::Tensor& labels_in,
                                                                 const std::optional<at::Tensor>& v_in,
                                                                 bool /*sparse_grad: autograd's*/) {
  xmcnas_fast::checks::label_attention_shortlist_inputs(h_in, mask_in, W_in, labels_in, v_in);
  const at::Tensor h = h_in.contiguous(), mask = mask_in.contiguous(), W = W_in.contiguous(),
                   labels = labels_in.contiguous();
  check_label_values(labels, W.size(0));
  const at::Tensor v = v_in ? v_in->contiguous() : at::Tensor();
  const int64_t B = h.size(0), K = labels.size(1), Dv = v.defined() ? v.size(2) : h.size(2);
  at::Tensor ctx = xmcnas_fast::cpu::empty_output({B, K, Dv}, h.options());
  at::Tensor lse = at::empty({B, K}, h.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_shortlist", [&] {
    forward_impl<scalar_t>(h, mask, W, labels, v, ctx, lse);
  });
  return {ctx, lse};
}

// Backward. With p = exp(s - lse), values u_n (v[b,n], or h[b,n] without v) and
// ds = p * (grad_ctx[b,k].u_n - sum_n p grad_ctx[b,k].u_n):
//   grad_v[b,n] = sum_k p grad_ctx[b,k],   grad_h[b,n] = sum_k ds W[l],   grad_rows[b,k] = sum_n ds h[b,n];
// without v, grad_h gets both sums over k (one buffer). grad_h (and grad_v) of a row is owned by the
// thread whose range covers all of that row's tasks and written once; a row cut between two ranges
// (at most two per thread) is handed back as a partial sum and added after the parallel region, in
// range order: results do not depend on scheduling.
template <typename scalar_t>
void backward_impl(const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                   const at::Tensor& labels, const at::Tensor& v, const at::Tensor& lse, at::Tensor& grad_h,
                   at::Tensor& grad_rows, at::Tensor& grad_v) {
  using acc_t = acc_type<scalar_t>;
  const bool has_v = v.defined();
  const Plan plan(h, mask, labels, W.size(0), has_v ? v.size(2) : h.size(2), std::is_same_v<acc_t, float>);
  const int64_t B = plan.B, D = plan.D, Dv = plan.Dv, K = plan.K, sbk = plan.sb, nsb = plan.nsb,
                nr_max = plan.nr_max;
  const scalar_t* hp = h.data_ptr<scalar_t>();
  const scalar_t* vp = has_v ? v.data_ptr<scalar_t>() : hp;
  const scalar_t* Wp = W.data_ptr<scalar_t>();
  const scalar_t* gop = grad_ctx.data_ptr<scalar_t>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* lse_all = lse.data_ptr<float>();
  scalar_t* ghp = grad_h.data_ptr<scalar_t>();
  scalar_t* gvp = has_v ? grad_v.data_ptr<scalar_t>() : nullptr;
  scalar_t* grp = grad_rows.data_ptr<scalar_t>();
  if (nsb == 0) {  // no slots (K = 0): no task writes the rows
    std::fill(ghp, ghp + grad_h.numel(), scalar_t(0));
    if (has_v) std::fill(gvp, gvp + grad_v.numel(), scalar_t(0));
    return;
  }
  struct CutRow {
    int64_t b;
    std::vector<acc_t> gh, gv;  // partial sums, compact [nr, D] and [nr, Dv] (gv only with v)
  };
  std::vector<std::vector<CutRow>> cut_rows(plan.parts);

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    // per thread, once per call: hc, hT, gh [nr, D] each; with v: vT, gv [nr, Dv] each; the W rows
    // [sb, D]; P and dS [sb, nr]; grad_ctx widened [sb, Dv]; the gradient of the rows [sb, D]; lse [sb]
    std::vector<acc_t> buf(3 * nr_max * D + (has_v ? 2 * nr_max * Dv : 0) + 2 * sbk * D + 2 * sbk * nr_max +
                           sbk * Dv + sbk);
    std::vector<int64_t> slot(sbk);
    acc_t* const hc = buf.data();
    acc_t* const hT = hc + nr_max * D;
    acc_t* const gh = hT + nr_max * D;
    acc_t* const vT = has_v ? gh + nr_max * D : hT;  // the values transposed, [Dv, nr]
    acc_t* const gv = has_v ? vT + nr_max * Dv : gh;  // grad of the values, [nr, Dv]
    acc_t* const Wk = gh + nr_max * D + (has_v ? 2 * nr_max * Dv : 0);
    acc_t* const gW = Wk + sbk * D;
    acc_t* const pp = gW + sbk * D;
    acc_t* const ds = pp + sbk * nr_max;
    acc_t* const go = ds + sbk * nr_max;
    acc_t* const lse_k = go + sbk * Dv;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t first = plan.bounds[p], last = plan.bounds[p + 1];
      int64_t cur_b = -1;
      auto flush = [&] {
        if (cur_b < 0) return;
        const int64_t nr = plan.count(cur_b);
        if (cur_b * nsb >= first && (cur_b + 1) * nsb <= last) {  // the whole row is ours
          scatter_real(ghp, plan, cur_b, D, gh);
          if (has_v) scatter_real(gvp, plan, cur_b, Dv, gv);
        } else {
          cut_rows[p].push_back({cur_b, std::vector<acc_t>(gh, gh + nr * D),
                                 has_v ? std::vector<acc_t>(gv, gv + nr * Dv) : std::vector<acc_t>()});
        }
      };
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / nsb, k0 = (task % nsb) * sbk;
        const int64_t n = std::min(sbk, K - k0), nr = plan.count(b);
        scalar_t* rows_out = grp + (b * K + k0) * D;
        std::fill(rows_out, rows_out + n * D, scalar_t(0));  // padding slots and rows without a real token
        if (b != cur_b) {
          flush();
          cur_b = b;
          gather_real(hp, plan, b, D, hc, hT);
          std::fill(gh, gh + nr * D, acc_t(0));
          if (has_v) {
            gather_real(vp, plan, b, Dv, gv, vT);  // gv as scratch for the compact copy
            std::fill(gv, gv + nr * Dv, acc_t(0));
          }
        }
        if (nr == 0) continue;
        const int64_t m = gather_rows(Wp, lab, plan, b, k0, n, slot.data(), Wk);
        for (int64_t i = 0; i < m; ++i) {
          const scalar_t* g = gop + (b * K + k0 + slot[i]) * Dv;
          for (int64_t d = 0; d < Dv; ++d) go[i * Dv + d] = static_cast<acc_t>(g[d]);
          lse_k[i] = static_cast<acc_t>(lse_all[b * K + k0 + slot[i]]);
        }
        gemm(plan.vec, m, nr, D, Wk, D, 1, hT, nr, pp, nr, false);   // scores
        gemm(plan.vec, m, nr, Dv, go, Dv, 1, vT, nr, ds, nr, false);  // dP = grad_ctx . u_n
        exp_grad(plan.vec, pp, ds, m, nr, lse_k);                     // P = exp(S - lse), dS
        gemm(plan.vec, nr, Dv, m, pp, 1, nr, go, Dv, gv, Dv, true);   // grad_v += P^T grad_ctx
        gemm(plan.vec, nr, D, m, ds, 1, nr, Wk, D, gh, D, true);      // grad_h += dS^T W rows
        gemm(plan.vec, m, D, nr, ds, nr, 1, hc, D, gW, D, false);     // grad_rows = dS h
        for (int64_t i = 0; i < m; ++i) {
          scalar_t* o = rows_out + slot[i] * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(gW[i * D + d]);
        }
      }
      flush();
    }
  });

  // rows cut between thread ranges: partial sums added in range order
  std::vector<CutRow> row_sum(B);
  std::vector<bool> seen(B, false);
  for (auto& rows : cut_rows)
    for (auto& r : rows) {
      CutRow& s = row_sum[r.b];
      if (!seen[r.b]) {
        s = std::move(r);
        seen[s.b] = true;
        continue;
      }
      for (size_t i = 0; i < s.gh.size(); ++i) s.gh[i] += r.gh[i];
      for (size_t i = 0; i < s.gv.size(); ++i) s.gv[i] += r.gv[i];
    }
  for (int64_t b = 0; b < B; ++b) {
    if (!seen[b]) continue;
    scatter_real(ghp, plan, b, D, row_sum[b].gh.data());
    if (has_v) scatter_real(gvp, plan, b, Dv, row_sum[b].gv.data());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_shortlist_backward_cpu(
    const at::Tensor& grad_ctx_in, const at::Tensor& h_in, const at::Tensor& mask_in, const at::Tensor& W_in,
    const at::Tensor& labels_in, const std::optional<at::Tensor>& v_in, const at::Tensor& ctx_in,
    const at::Tensor& lse_in) {
  xmcnas_fast::checks::label_attention_shortlist_inputs(h_in, mask_in, W_in, labels_in, v_in);
  xmcnas_fast::checks::label_attention_shortlist_saved(h_in, labels_in, v_in, grad_ctx_in, ctx_in, lse_in);
  const at::Tensor grad_ctx = grad_ctx_in.contiguous(), h = h_in.contiguous(), mask = mask_in.contiguous(),
                   W = W_in.contiguous(), labels = labels_in.contiguous(), lse = lse_in.contiguous();
  check_label_values(labels, W.size(0));
  const at::Tensor v = v_in ? v_in->contiguous() : at::Tensor();
  at::Tensor grad_h = at::empty_like(h);  // every row written by the kernel, padding included
  at::Tensor grad_rows = xmcnas_fast::cpu::empty_output({h.size(0), labels.size(1), h.size(2)}, h.options());
  at::Tensor grad_v = v.defined() ? at::empty_like(v) : at::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_shortlist_backward",
                                  [&] { backward_impl<scalar_t>(grad_ctx, h, mask, W, labels, v, lse, grad_h,
                                                                grad_rows, grad_v); });
  return {grad_h, grad_rows, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("label_attention_shortlist", &label_attention_shortlist_cpu);
  m.impl("label_attention_shortlist_backward", &label_attention_shortlist_backward_cpu);
}
