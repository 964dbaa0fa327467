// What the CPU kernels of the attention head share (label_attention.cpp, label_attention_head.cpp):
// the plan of a call (its real tokens, labels per task, units, the split over threads), the gathers
// of a row's real tokens, the packed path's pieces (S^T = H W^T from W^T's panels, the softmax over
// a row's tokens along S^T's columns and its backward), and the hand-back of rows whose gradient
// two threads share. The design of both paths is described at the top of label_attention.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "task_split.h"

namespace xmcnas_fast::cpu::attention {

using xmcnas_fast::cpu::balanced_split;
using xmcnas_fast::cpu::has_avx512;

constexpr int64_t kLabelBlock = 128;         // the fewest labels per task
constexpr int64_t kMaxLabelBlock = 4096;     // the most
constexpr int64_t kTileElems = 128 * 256;    // scores per tile: labels per task x tokens per tile
constexpr int64_t kTokenTile = 256;          // tokens per score tile (a multiple of kTokenQuantum)
constexpr int64_t kTokenQuantum = 16;        // rows are padded to a multiple of this many tokens
constexpr int64_t kShortRow = 64;            // the packed path up to this many tokens a row
constexpr int64_t kShortWidth = 128;         // and this D and Dv (oneDNN's kernels are faster past them)
constexpr int64_t kPackTokens = 48;          // the most real tokens of the rows packed in one unit
constexpr int64_t kPackLabels = 512;         // labels per task on the packed path (a multiple of kPanel)
constexpr int64_t kPanel = 32;               // labels per panel of W^T: the GEMM's column panel

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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

// W [L, D] as W^T in panels of kPanel labels, WT [ceil(L / kPanel), D, kPanel], zero past label L: a
// panel (8 KB at D = 64) stays in L1 while it is written, so a plain loop does it (torch's copy of the
// transposed view took four times as long, twice a training step).
inline void panel_transpose(const float* W, int64_t L, int64_t D, float* WT) {
  const int64_t panels = (L + kPanel - 1) / kPanel;
  for (int64_t pn = 0; pn < panels; ++pn)
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t l = pn * kPanel + j;
      float* out = WT + pn * D * kPanel + j;
      for (int64_t d = 0; d < D; ++d) out[d * kPanel] = l < L ? W[l * D + d] : 0.0f;
    }
}

// What forward and backward share: the shapes, the real tokens, W in the
// accumulation type, the labels per task, and the split of the tasks over
// threads. A task is (unit, label block), unit-major; a unit is one batch row,
// or on the packed path (`packed`: float32 arithmetic on AVX-512, every row at
// most kShortRow real tokens, D and Dv at most kShortWidth) a group of
// consecutive rows whose real tokens together fit kPackTokens. The cost of a
// task is its tokens times its labels, plus a little for the fixed work per row.
struct Plan {
  int64_t B, N, D, L, np_max, tile, lb, nlb, parts;
  bool vec;     // float32 arithmetic on AVX-512: the exponentials vectorized here
  bool packed;  // and short rows: the packed path, scores with the labels along the vector lanes
  RealTokens rt;
  at::Tensor Wa;
  at::Tensor WT;                // packed: W^T in panels of kPanel labels, [L / kPanel, D, kPanel], float32
  std::vector<int64_t> group;   // unit u covers batch rows [group[u], group[u+1])
  int64_t max_group_tokens = 0;  // packed: the most real tokens of a unit
  int64_t max_group_rows = 1;    // and the most batch rows
  std::vector<int64_t> bounds;  // thread range p covers tasks [bounds[p], bounds[p+1])

  Plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, int64_t Dv, at::ScalarType acc_dtype)
      : B(h.size(0)), N(h.size(1)), D(h.size(2)), L(W.size(0)), rt(mask),
        Wa(W.to(acc_dtype)) {  // W.to: no-op for f32/f64
    vec = acc_dtype == at::kFloat && has_avx512();
    np_max = 0;
    for (int64_t b = 0; b < B; ++b) np_max = std::max(np_max, rt.padded(b));
    packed = vec && np_max <= kShortRow && D <= kShortWidth && Dv <= kShortWidth;
    tile = std::clamp<int64_t>(np_max, kTokenQuantum, kTokenTile);
    group.push_back(0);
    std::vector<int64_t> unit_tokens;
    if (packed) {
      lb = std::min<int64_t>(kPackLabels, std::max<int64_t>(L, 1));
      const int64_t panels = (L + kPanel - 1) / kPanel;
      WT = at::empty({panels, D, kPanel}, Wa.options());
      panel_transpose(Wa.data_ptr<float>(), L, D, WT.data_ptr<float>());
      for (int64_t b = 0, r = 0; b < B; ++b) {
        if (b > group.back() && r + rt.count(b) > kPackTokens) {
          group.push_back(b);
          unit_tokens.push_back(r);
          r = 0;
        }
        r += rt.count(b);
        if (b == B - 1) unit_tokens.push_back(r);
      }
      if (B > 0) group.push_back(B);
      for (int64_t t : unit_tokens) max_group_tokens = std::max(max_group_tokens, t);
      for (int64_t u = 0; u < units(); ++u) max_group_rows = std::max(max_group_rows, group[u + 1] - group[u]);
    } else {
      lb = std::clamp<int64_t>(kTileElems / tile / kTokenQuantum * kTokenQuantum, kLabelBlock, kMaxLabelBlock);
      for (int64_t b = 0; b < B; ++b) {
        group.push_back(b + 1);
        unit_tokens.push_back(rt.padded(b));
      }
    }
    nlb = (L + lb - 1) / lb;
    const int64_t nu = units();
    std::vector<double> cost;
    cost.reserve(nu * nlb);
    for (int64_t u = 0; u < nu; ++u)
      for (int64_t j = 0; j < nlb; ++j)
        cost.push_back(static_cast<double>(unit_tokens[u] + 8 * (group[u + 1] - group[u])) *
                       static_cast<double>(std::min(lb, L - j * lb)));
    const int64_t tasks = nu * nlb;
    bounds = balanced_split(cost, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
    parts = static_cast<int64_t>(bounds.size()) - 1;
  }
  int64_t units() const { return static_cast<int64_t>(group.size()) - 1; }
};

// The real tokens of row b of x [B,N,D] (h or v), in the accumulation type, as nr rows of xc [nr, D].
template <typename scalar_t, typename acc_t>
void gather_rows(const at::Tensor& x, const RealTokens& rt, int64_t b, acc_t* xc) {
  const int64_t N = x.size(1), D = x.size(2), nr = rt.count(b);
  const scalar_t* src = x.data_ptr<scalar_t>() + b * N * D;
  const int64_t* pos = rt.positions(b);
  for (int64_t j = 0; j < nr; ++j)
    for (int64_t d = 0; d < D; ++d) xc[j * D + d] = static_cast<acc_t>(src[pos[j] * D + d]);
}

// The real tokens of row b of x [B,N,D] (h or v), in the accumulation type,
// as xc [Np, D] and, unless xT is null, its transpose xT [D, Np]
// (Np = rt.padded(b)), zero past the real ones.
template <typename scalar_t, typename acc_t>
void gather_real(const at::Tensor& x, const RealTokens& rt, int64_t b, acc_t* xc, acc_t* xT) {
  const int64_t D = x.size(2), nr = rt.count(b), np = rt.padded(b);
  gather_rows<scalar_t>(x, rt, b, xc);
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

// A row's gradients of its real tokens, compact ([Nr, D] and [Nr, Dv]), as a thread leaves it: written
// to grad_h (grad_v) when the thread's range covered all of the row's tasks, else kept as a partial sum.
struct CutRow {
  int64_t b;
  at::Tensor gh, gv;  // partial sums, compact [Nr, D] and [Nr, Dv] (gv only with v)
};

template <typename scalar_t, typename acc_t>
void leave_row(const RealTokens& rt, int64_t b, bool whole, const acc_t* gh, const acc_t* gv, int64_t D, int64_t Dv,
               bool has_v, at::Tensor& grad_h, at::Tensor& grad_v, std::vector<CutRow>& cut) {
  const int64_t nr = rt.count(b);
  if (nr == 0) return;
  if (whole) {
    scatter_real<scalar_t>(grad_h, rt, b, gh);
    if (has_v) scatter_real<scalar_t>(grad_v, rt, b, gv);
    return;
  }
  const auto copy = [&](const acc_t* src, int64_t n) {
    at::Tensor t = at::empty({n}, grad_h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    std::copy(src, src + n, t.template data_ptr<acc_t>());
    return t;
  };
  cut.push_back({b, copy(gh, nr * D), has_v ? copy(gv, nr * Dv) : at::Tensor()});
}

// The rows of unit u as the packed backward's range [first, last) of tasks leaves them: leave_row for
// each, gh [R, D] and gv [R, Dv] the unit's stacked gradients, row0[i] the first stacked row of its i-th row.
template <typename scalar_t>
void leave_unit(const Plan& plan, int64_t u, int64_t first, int64_t last, const int64_t* row0, const float* gh,
                const float* gv, int64_t Dv, bool has_v, at::Tensor& grad_h, at::Tensor& grad_v,
                std::vector<CutRow>& cut) {
  const bool whole = u * plan.nlb >= first && (u + 1) * plan.nlb <= last;
  for (int64_t b = plan.group[u]; b < plan.group[u + 1]; ++b) {
    const int64_t r0 = row0[b - plan.group[u]];
    leave_row<scalar_t>(plan.rt, b, whole, gh + r0 * plan.D, gv + r0 * Dv, plan.D, Dv, has_v, grad_h, grad_v, cut);
  }
}

// Adds the partial sums of the rows cut between thread ranges, in range order, into grad_h (grad_v).
template <typename scalar_t, typename acc_t>
void add_cut_rows(const std::vector<std::vector<CutRow>>& cut_rows, const RealTokens& rt, int64_t B, bool has_v,
                  at::Tensor& grad_h, at::Tensor& grad_v) {
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
}

#if XMCNAS_HAS_AVX512_CODE
// The packed path. Scores are laid out transposed, S^T [R, lb]: the R real tokens of a unit's rows,
// stacked, by the task's labels along the vector lanes, so that short rows waste no lane on padding
// and the softmax over a row's tokens is element-wise across its rows of S^T.

// Softmax over the n rows of S^T [n, lb] (a batch row's tokens), in place: P^T, normalized; the
// log-sum-exp of each label to lse (unless null).
XMCNAS_AVX512 inline void softmax_columns(float* st, int64_t n, int64_t lb, float* lse) {
  for (int64_t j = 0; j < lb; j += 16) {
    const __mmask16 k = xmcnas_fast::cpu::first_lanes(lb - j);
    __m512 m = _mm512_maskz_loadu_ps(k, st + j);
    for (int64_t r = 1; r < n; ++r) m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(k, st + r * lb + j));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; ++r) {
      const __m512 e = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, st + r * lb + j), m));
      _mm512_mask_storeu_ps(st + r * lb + j, k, e);
      sum = _mm512_add_ps(sum, e);
    }
    sum = _mm512_mask_blend_ps(k, _mm512_set1_ps(1.0f), sum);  // lanes past lb: a harmless 1
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    for (int64_t r = 0; r < n; ++r)
      _mm512_mask_storeu_ps(st + r * lb + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, st + r * lb + j), inv));
    if (lse != nullptr) _mm512_mask_storeu_ps(lse + j, k, _mm512_add_ps(m, xmcnas_fast::cpu::log512(sum)));
  }
}

// The backward's element-wise pass over a batch row's n rows of S^T and dP^T [n, lb]:
// P^T = exp(S^T - lse) into st; delta = sum_n P dP; dS^T = P^T (dP^T - delta) into dpt.
XMCNAS_AVX512 inline void exp_grad_columns(float* st, float* dpt, int64_t n, int64_t lb, const float* lse) {
  for (int64_t j = 0; j < lb; j += 16) {
    const __mmask16 k = xmcnas_fast::cpu::first_lanes(lb - j);
    const __m512 l = _mm512_maskz_loadu_ps(k, lse + j);
    __m512 delta = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; ++r) {
      const __m512 p = xmcnas_fast::cpu::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, st + r * lb + j), l));
      _mm512_mask_storeu_ps(st + r * lb + j, k, p);
      delta = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(k, dpt + r * lb + j), delta);
    }
    for (int64_t r = 0; r < n; ++r) {
      const __m512 p = _mm512_maskz_loadu_ps(k, st + r * lb + j);
      const __m512 d = _mm512_maskz_loadu_ps(k, dpt + r * lb + j);
      _mm512_mask_storeu_ps(dpt + r * lb + j, k, _mm512_mul_ps(p, _mm512_sub_ps(d, delta)));
    }
  }
}

// S^T [R, lb] = H [R, D] W^T for the labels l0 .. l0 + lb, from W^T's panels (each panel's [D, kPanel]
// block is contiguous: read row by row as the GEMM wants it, without the cache conflicts of rows L apart).
XMCNAS_AVX512 inline void scores_t(const Plan& plan, const float* hs, int64_t R, int64_t l0, int64_t lb, float* st) {
  const float* WT = plan.WT.data_ptr<float>();
  const int64_t D = plan.D;
  for (int64_t j = 0; j < lb; j += kPanel)
    xmcnas_fast::cpu::gemm_avx512(R, std::min(kPanel, lb - j), D, hs, D, 1, WT + (l0 + j) / kPanel * D * kPanel,
                                  kPanel, st + j, lb, false);
}

// The real tokens of a unit's rows, stacked: x's into xs [R, D]; first[i]: the first stacked row of
// the unit's i-th batch row. Returns R.
template <typename scalar_t>
int64_t gather_unit(const Plan& plan, int64_t u, const at::Tensor& x, float* xs, int64_t* first) {
  const int64_t D = x.size(2);
  int64_t r = 0;
  for (int64_t b = plan.group[u]; b < plan.group[u + 1]; ++b) {
    first[b - plan.group[u]] = r;
    gather_rows<scalar_t>(x, plan.rt, b, xs + r * D);
    r += plan.rt.count(b);
  }
  return r;
}
// The packed forward, in parallel over the plan's thread ranges: for each row b with a real token and
// label block l0 .. l0 + lb, the softmax of its scores (the log-sum-exp to lse_at(b, l0) unless that is
// null), then its context C = P V [lb, Dv] into dest(b, l0), or a per-thread tile where that is null, and
// the epilogue on it: epilogue(b, l0, lb, C), the epilogue made by make_epilogue() once per thread (its
// own scratch). A row without a real token goes to empty(b, l0, lb) instead.
template <typename scalar_t, typename Dest, typename LseAt, typename MakeEpilogue, typename Empty>
void packed_forward_tiles(const Plan& plan, const at::Tensor& h, const at::Tensor& v, Dest dest, LseAt lse_at,
                          MakeEpilogue make_epilogue, Empty empty) {
  using xmcnas_fast::cpu::gemm_avx512;
  const bool has_v = v.defined();
  const int64_t D = plan.D, Dv = has_v ? v.size(2) : D, L = plan.L, lbk = plan.lb, nlb = plan.nlb,
                R_max = plan.max_group_tokens;
  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    // per thread, once per call: the unit's tokens [R, D] and values [R, Dv], S^T [R, lb], a context tile
    std::vector<float> buf(R_max * D + (has_v ? R_max * Dv : 0) + R_max * lbk + lbk * Dv);
    std::vector<int64_t> first(plan.max_group_rows);
    float* const hs = buf.data();
    float* const vs = has_v ? hs + R_max * D : hs;
    float* const st = hs + R_max * D + (has_v ? R_max * Dv : 0);
    float* const tile = st + R_max * lbk;
    auto epilogue = make_epilogue();
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cur_u = -1, R = 0;
      for (int64_t task = plan.bounds[p]; task < plan.bounds[p + 1]; ++task) {
        const int64_t u = task / nlb, l0 = (task % nlb) * lbk, lb = std::min(lbk, L - l0);
        if (u != cur_u) {
          R = gather_unit<scalar_t>(plan, u, h, hs, first.data());
          if (has_v) gather_unit<scalar_t>(plan, u, v, vs, first.data());
          cur_u = u;
        }
        if (R > 0) scores_t(plan, hs, R, l0, lb, st);  // S^T = H W^T
        for (int64_t b = plan.group[u]; b < plan.group[u + 1]; ++b) {
          const int64_t nr = plan.rt.count(b), r0 = first[b - plan.group[u]];
          if (nr == 0) {
            empty(b, l0, lb);
            continue;
          }
          softmax_columns(st + r0 * lb, nr, lb, lse_at(b, l0));
          float* c = dest(b, l0);
          if (c == nullptr) c = tile;
          gemm_avx512(lb, Dv, nr, st + r0 * lb, 1, lb, vs + r0 * Dv, Dv, c, Dv, false);  // C = P V
          epilogue(b, l0, lb, static_cast<const float*>(c));
        }
      }
    }
  });
}

#endif  // XMCNAS_HAS_AVX512_CODE

}  // namespace xmcnas_fast::cpu::attention
