// Top-k ranking metrics on the CPU: per row, the k best scores by partial
// selection, then hits, nDCG and propensity-scored hits against a CSR truth,
// summed over rows at every rank 1..k.
//
// Selection keeps a k-sized buffer of the best (score, label) pairs seen so
// far and scans the row once. Most scores fall below the buffer's worst
// entry: a cache line of scores is rejected with one vector comparison
// against that threshold per lane group, and only the entries of a line that
// pass it (candidates, or a NaN) are looked at one by one. NaN detection
// thus costs nothing extra. For k <= 16 the threshold starts at a lower bound
// of the k-th best score taken from the row's first scores, so that few
// entries pass at all. Ties rank the lower label id first: the scan goes
// in increasing label order, so a later score enters only when strictly
// greater than the worst kept one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../checks.h"

namespace {

template <typename T>
struct Cand {
  T v;
  int64_t i;
};

// Rank order: higher score first, then lower label id.
template <typename T>
inline bool ranks_before(const Cand<T>& a, const Cand<T>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// The k best candidates seen so far, pushed in scan order: a newcomer has the
// highest label id yet, so among equal scores it ranks last, and once the
// buffer is full it enters only with a score above the worst kept one.
//
// Small k: scores and ids in sorted arrays, best first, insertion by
// shifting. Large k: a heap of candidates whose top is the worst.
template <typename T>
class TopkBuffer {
 public:
  static constexpr int64_t kSortedMax = 32;

  explicit TopkBuffer(int64_t k) : k_(k), heap_(k > kSortedMax) {
    if (heap_) {
      heap_buf_.resize(k);
    } else {
      vals_.resize(k);
      ids_.resize(k);
    }
  }

  int64_t k() const { return k_; }
  void clear() { n_ = 0; }
  bool full() const { return n_ == k_; }
  // The score a newcomer must exceed, once full.
  T worst() const { return heap_ ? heap_buf_[0].v : vals_[k_ - 1]; }

  // Adds a candidate; once full, only one with v > worst().
  void push(T v, int64_t i) {
    if (heap_) {
      push_heap(v, i);
      return;
    }
    T* vals = vals_.data();
    int64_t* ids = ids_.data();
    int64_t pos = n_ < k_ ? n_++ : k_ - 1;
    while (pos > 0 && v > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = v;
    ids[pos] = i;
  }

  // Writes the k kept label ids, best first.
  void write_ids(int64_t* out) {
    if (heap_) {
      std::sort_heap(heap_buf_.begin(), heap_buf_.end(), ranks_before<T>);
      for (int64_t j = 0; j < k_; ++j) out[j] = heap_buf_[j].i;
    } else {
      std::copy(ids_.begin(), ids_.end(), out);
    }
  }

 private:
  void push_heap(T v, int64_t i) {
    if (n_ < k_) {
      heap_buf_[n_++] = {v, i};
      if (n_ == k_) std::make_heap(heap_buf_.begin(), heap_buf_.end(), ranks_before<T>);
      return;
    }
    std::pop_heap(heap_buf_.begin(), heap_buf_.end(), ranks_before<T>);
    heap_buf_[k_ - 1] = {v, i};
    std::push_heap(heap_buf_.begin(), heap_buf_.end(), ranks_before<T>);
  }

  int64_t k_;
  int64_t n_ = 0;
  bool heap_;
  std::vector<T> vals_;
  std::vector<int64_t> ids_;
  std::vector<Cand<T>> heap_buf_;
};

// The threshold test on one cache line of scores: bit j of bits() is set
// where p[j] is above thr or NaN (a NaN compares false with anything, so
// "not <= thr" catches both with one comparison); any() says whether some
// bit is set. SSE2 (the x86-64 baseline) where available, else plain loops.
template <typename T>
struct LineTest {
  static constexpr int B = 64 / sizeof(T);
  static inline bool any(const T* p, T thr) {
    int any = 0;
    for (int j = 0; j < B; ++j) any |= !(p[j] <= thr);
    return any != 0;
  }
  static inline uint32_t bits(const T* p, T thr) {
    uint32_t bits = 0;
    for (int j = 0; j < B; ++j) bits |= static_cast<uint32_t>(!(p[j] <= thr)) << j;
    return bits;
  }
  // gmax[j] = the max of p[j], p[16 + j], ... over p[0..n), n a multiple of 16
  // (a NaN may or may not come through).
  static inline void group_max(const T* p, int64_t n, T* gmax) {
    for (int j = 0; j < 16; ++j) gmax[j] = p[j];
    for (int64_t i = 16; i < n; i += 16) {
      for (int j = 0; j < 16; ++j) gmax[j] = gmax[j] < p[i + j] ? p[i + j] : gmax[j];
    }
  }
};

#if defined(__SSE2__)
// SSE2 lanes of float and double, under one name.
template <typename T>
struct Sse;
template <>
struct Sse<float> {
  using V = __m128;
  static constexpr int W = 4;
  static V set1(float x) { return _mm_set1_ps(x); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V a) { _mm_storeu_ps(p, a); }
  static V above(const float* p, V t) { return _mm_cmpnle_ps(_mm_loadu_ps(p), t); }
  static V bit_or(V a, V b) { return _mm_or_ps(a, b); }
  static V max(V a, V b) { return _mm_max_ps(a, b); }
  static int mask(V a) { return _mm_movemask_ps(a); }
};
template <>
struct Sse<double> {
  using V = __m128d;
  static constexpr int W = 2;
  static V set1(double x) { return _mm_set1_pd(x); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static void store(double* p, V a) { _mm_storeu_pd(p, a); }
  static V above(const double* p, V t) { return _mm_cmpnle_pd(_mm_loadu_pd(p), t); }
  static V bit_or(V a, V b) { return _mm_or_pd(a, b); }
  static V max(V a, V b) { return _mm_max_pd(a, b); }
  static int mask(V a) { return _mm_movemask_pd(a); }
};

template <typename T>
struct SseLineTest {
  using S = Sse<T>;
  static constexpr int B = 4 * S::W;  // 64 bytes
  static inline bool any(const T* p, T thr) {
    const typename S::V t = S::set1(thr);
    const typename S::V a = S::bit_or(S::above(p, t), S::above(p + S::W, t));
    const typename S::V b = S::bit_or(S::above(p + 2 * S::W, t), S::above(p + 3 * S::W, t));
    return S::mask(S::bit_or(a, b)) != 0;
  }
  static inline uint32_t bits(const T* p, T thr) {
    const typename S::V t = S::set1(thr);
    uint32_t bits = 0;
    for (int q = 0; q < 4; ++q) bits |= static_cast<uint32_t>(S::mask(S::above(p + q * S::W, t))) << (q * S::W);
    return bits;
  }
  static inline void group_max(const T* p, int64_t n, T* gmax) {
    constexpr int NV = 16 / S::W;  // vectors a group row
    typename S::V m[NV];
    for (int q = 0; q < NV; ++q) m[q] = S::load(p + q * S::W);
    for (int64_t i = 16; i < n; i += 16) {
      for (int q = 0; q < NV; ++q) m[q] = S::max(S::load(p + i + q * S::W), m[q]);
    }
    for (int q = 0; q < NV; ++q) S::store(gmax + q * S::W, m[q]);
  }
};
template <>
struct LineTest<float> : SseLineTest<float> {};
template <>
struct LineTest<double> : SseLineTest<double> {};
#endif

constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the scan to prefetch
constexpr int kSeedGroups = 16;
constexpr int64_t kSeedPrefix = 512;      // scores looked at to seed the threshold
constexpr int64_t kSeedMinL = 256;

// Scans x[i..L) and pushes into buf every entry that passes the threshold
// test; thr is the score to exceed: buf's worst once buf is full, before
// that a bound chosen by the caller. Returns false at a NaN.
template <typename T>
bool scan(const T* x, int64_t i, int64_t L, T thr, TopkBuffer<T>& buf) {
  constexpr int B = LineTest<T>::B;
  // The threshold is re-read because a line's bits were computed before the
  // line's earlier entries raised it.
  auto visit = [&](int64_t j) -> bool {
    const T v = x[j];
    if (!(v <= thr)) {
      if (v != v) return false;
      buf.push(v, j);
      if (buf.full()) thr = buf.worst();
    }
    return true;
  };
  const int64_t head = std::min(L, (i + B - 1) / B * B);
  for (; i < head; ++i) {
    if (!visit(i)) return false;
  }
  for (; i + B <= L; i += B) {
    // Well ahead of the hardware prefetcher: into the next row near the end of
    // this one, and over the stalls that follow a line with a candidate.
    __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes);
    if (!LineTest<T>::any(x + i, thr)) continue;
    for (uint32_t bits = LineTest<T>::bits(x + i, thr); bits; bits &= bits - 1) {
      if (!visit(i + __builtin_ctz(bits))) return false;
    }
  }
  for (; i < L; ++i) {
    if (!visit(i)) return false;
  }
  return true;
}

// A lower bound on the k-th best score of x (k <= kSeedGroups), to start the
// scan with a high threshold rather than with the first k scores: each entry
// that passes the threshold costs a branch miss, and with a low threshold the
// first ones pass often. The maxima of kSeedGroups interleaved groups of the
// prefix are distinct entries, so their k-th largest is at most the k-th best
// score. Returns NaN when a maximum is NaN (the row holds one).
template <typename T>
T seed_threshold(const T* x, int64_t L, int64_t k) {
  constexpr int G = kSeedGroups;
  T gmax[G];
  LineTest<T>::group_max(x, std::min(L, kSeedPrefix) / G * G, gmax);
  // The largest value with at least k values >= it, without branches (a
  // selection on 16 values mispredicts a lot).
  T kth = -std::numeric_limits<T>::infinity();
  for (int j = 0; j < G; ++j) {
    if (gmax[j] != gmax[j]) return gmax[j];
    int ge = 0;
    for (int i = 0; i < G; ++i) ge += gmax[i] >= gmax[j];
    kth = ge >= k && gmax[j] > kth ? gmax[j] : kth;
  }
  return kth;
}

// Selects the k best entries of x[0..L) into buf. Returns false when x holds
// a NaN (buf is then meaningless).
template <typename T>
bool select_row(const T* x, int64_t L, TopkBuffer<T>& buf) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t k = buf.k();
  buf.clear();
  if (k <= kSeedGroups && L >= kSeedMinL) {
    const T t0 = seed_threshold(x, L, k);
    if (t0 != t0) return false;
    // Entries >= t0 pass until buf is full (at least k of them exist).
    if (t0 != kNegInf) {
      const bool ok = scan(x, 0, L, std::nextafter(t0, kNegInf), buf);
      TORCH_INTERNAL_ASSERT(!ok || buf.full(), "topk_metrics: seeded selection kept fewer than k entries");
      return ok;
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const T v = x[i];
    if (v != v) return false;
    buf.push(v, i);
  }
  return scan(x, k, L, buf.worst(), buf);
}

struct Csr {
  const int64_t* indptr;
  const int64_t* indices;
};

// Row-independent constants and the per-row metric accumulation.
struct Metrics {
  int64_t k;
  const double* inv_prop;   // nullptr without propensities; else n_total entries
  std::vector<double> disc;   // 1 / log2(j + 2)
  std::vector<double> ideal;  // cumulative disc: ideal DCG over j+1 true labels

  Metrics(int64_t k_, const double* ip) : k(k_), inv_prop(ip), disc(k_), ideal(k_) {
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      disc[j] = 1.0 / std::log2(static_cast<double>(j) + 2.0);
      s += disc[j];
      ideal[j] = s;
    }
  }
};

// Per-thread scratch and one block's sums (rows: hits, nDCG, PSP numerator, PSP denominator).
struct RowScratch {
  std::vector<uint8_t> mark;   // n_total flags: label is true for the current row
  std::vector<double> best;    // inverse propensities of the row's distinct true labels
  std::vector<double> sums;    // [4, k]

  RowScratch(int64_t n_total, int64_t k) : mark(n_total, 0), sums(4 * k, 0.0) {}
};

void accumulate_row(const Metrics& m, const int64_t* top, const int64_t* truth, int64_t n_true,
                    RowScratch& s) {
  const int64_t k = m.k;
  double* hits = s.sums.data();
  double* ndcg = hits + k;
  double* psp_num = hits + 2 * k;
  double* psp_den = hits + 3 * k;
  s.best.clear();
  for (int64_t t = 0; t < n_true; ++t) {
    const int64_t lab = truth[t];
    if (!s.mark[lab]) {
      s.mark[lab] = 1;
      if (m.inv_prop) s.best.push_back(m.inv_prop[lab]);
    }
  }
  if (n_true > 0) {
    int64_t h = 0;
    double dcg = 0.0, psp = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t lab = top[j];
      if (s.mark[lab]) {
        ++h;
        dcg += m.disc[j];
        if (m.inv_prop) psp += m.inv_prop[lab];
      }
      hits[j] += static_cast<double>(h);
      ndcg[j] += dcg / m.ideal[std::min(j, n_true - 1)];
      psp_num[j] += psp;
    }
  }
  if (m.inv_prop) {
    const int64_t nb = static_cast<int64_t>(s.best.size());
    const int64_t top_n = std::min(k, nb);
    std::partial_sort(s.best.begin(), s.best.begin() + top_n, s.best.end(), std::greater<double>());
    double acc = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      if (j < top_n) acc += s.best[j];
      psp_den[j] += acc;
    }
  }
  for (int64_t t = 0; t < n_true; ++t) s.mark[truth[t]] = 0;
}

// Rows go in fixed blocks, each with its own partial sums, added up in block
// order afterwards: the sums do not depend on the number of threads.
int64_t rows_per_block(int64_t R) { return std::max<int64_t>(16, (R + 63) / 64); }

// Scores are read as T; reduced-precision rows are widened to float first.
template <typename scalar_t>
void topk_metrics_rows(const at::Tensor& scores, const Csr& csr, const Metrics& m, int64_t n_total,
                       int64_t* topk_out, std::vector<double>& partial, std::atomic<bool>& saw_nan) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool widen = !std::is_same_v<scalar_t, T>;
  const int64_t R = scores.size(0), L = scores.size(1), k = m.k;
  const int64_t row_stride = scores.stride(0);
  const scalar_t* base = scores.const_data_ptr<scalar_t>();
  const int64_t rpb = rows_per_block(R);
  const int64_t n_blocks = (R + rpb - 1) / rpb;
  partial.assign(n_blocks * 4 * k, 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / (rpb * L));
  at::parallel_for(0, n_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    TopkBuffer<T> buf(k);
    RowScratch scratch(n_total, k);
    std::vector<T> widened(widen ? L : 0);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(scratch.sums.begin(), scratch.sums.end(), 0.0);
      for (int64_t r = b * rpb; r < std::min(R, (b + 1) * rpb); ++r) {
        if (saw_nan.load(std::memory_order_relaxed)) return;
        const scalar_t* row = base + r * row_stride;
        const T* x;
        if constexpr (widen) {
          at::vec::convert(row, widened.data(), L);
          x = widened.data();
        } else {
          x = row;
        }
        if (!select_row<T>(x, L, buf)) {
          saw_nan.store(true, std::memory_order_relaxed);
          return;
        }
        int64_t* top = topk_out + r * k;
        buf.write_ids(top);
        const int64_t lo = csr.indptr[r];
        accumulate_row(m, top, csr.indices + lo, csr.indptr[r + 1] - lo, scratch);
      }
      std::copy(scratch.sums.begin(), scratch.sums.end(), partial.begin() + b * 4 * k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_metrics_cpu(const at::Tensor& scores_in, const at::Tensor& indptr_in,
                                                    const at::Tensor& indices_in, int64_t k,
                                                    const std::optional<at::Tensor>& inv_prop_in) {
  xmcnas_fast::checks::topk_metrics_inputs(scores_in, indptr_in, indices_in, k, inv_prop_in);
  const auto st = scores_in.scalar_type();
  const int64_t R = scores_in.size(0), L = scores_in.size(1);
  const at::Tensor indptr = indptr_in.to(at::kLong).contiguous();
  const at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t nnz = indices.numel();
  at::Tensor inv_prop;
  int64_t n_total = L;
  if (inv_prop_in.has_value()) {
    inv_prop = inv_prop_in->to(at::kDouble).contiguous();
    n_total = inv_prop.numel();
  }
  const int64_t* ip = indptr.const_data_ptr<int64_t>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  bool decreasing = false, negative = false, too_large = false;
  for (int64_t r = 0; r < R; ++r) decreasing = decreasing || ip[r + 1] < ip[r];
  for (int64_t t = 0; t < nnz; ++t) {
    negative = negative || idx[t] < 0;
    too_large = too_large || idx[t] >= n_total;
  }
  xmcnas_fast::checks::topk_metrics_values(ip[0] != 0 || ip[R] != nnz, decreasing, negative, too_large, false, nnz,
                                           n_total);

  // Rows must be unit-stride; the row stride itself may be anything.
  const at::Tensor scores = scores_in.stride(1) == 1 || L == 1 ? scores_in : scores_in.contiguous();
  at::Tensor topk = at::empty({R, k}, scores.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({4, k}, scores.options().dtype(at::kDouble));
  if (R == 0) return {sums, topk};

  const Metrics m(k, inv_prop.defined() ? inv_prop.const_data_ptr<double>() : nullptr);
  const Csr csr{ip, idx};
  std::vector<double> partial;
  std::atomic<bool> saw_nan{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "topk_metrics", [&] {
    topk_metrics_rows<scalar_t>(scores, csr, m, n_total, topk.mutable_data_ptr<int64_t>(), partial, saw_nan);
  });
  xmcnas_fast::checks::topk_metrics_values(false, false, false, false, saw_nan.load(), nnz, n_total);
  double* out = sums.mutable_data_ptr<double>();
  for (size_t t = 0; t < partial.size(); ++t) out[t % (4 * k)] += partial[t];
  return {sums, topk};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("topk_metrics", &topk_metrics_cpu);
}
