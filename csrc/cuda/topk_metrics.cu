// Top-k ranking metrics on CUDA: the scores stay on the device; only the
// [4, k] sums and a handful of error flags come back.
//
// k <= 32: one warp per row. Each lane scans every 32nd 16-byte piece of the
// row (4 float32 scores, 8 bfloat16) and keeps its own best KMAX (8 or 32) in
// registers (insertion by compare-and-swap, static indices only); k rounds of
// a warp arg-max over the lanes' heads then give the row's top k, in order,
// lane r holding rank r. Nothing sorts L. Order: higher score first, lower
// label id on ties (the reference's stable sort).
// k > 32: a stable device sort of the rows (slower, [R, L] temporaries), then
// the same metric code over chunks of 32 ranks.
//
// Metrics of a row at rank j (0-based), summed over rows:
//   [0] hits in the top j+1
//   [1] nDCG@(j+1) = DCG / IDCG(min(j+1, #true))       (0 for an empty truth)
//   [2] sum of inv_prop over the hits in the top j+1
//   [3] the best [2] achievable: the j+1 largest inv_prop of the true labels
// Per-block partial sums go to a [blocks, 4, k] float64 buffer summed in a
// fixed order: no atomics, reproducible sums.
//
// Malformed input (CSR, NaN scores, label ids out of range) is flagged on the
// device by the kernels (which stay memory-safe whatever the CSR says) and
// raised as ValueError after one device-to-host copy of the flags, which is
// the only synchronisation of the call.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace xmcnas_fast::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kNoLabel = std::numeric_limits<int>::max();

enum Flag { kBadEnds = 0, kDecreasing, kNegative, kNaN, kTooLarge, kFlags };

// ---------------------------------------------------------------------------
// CSR validation, and first-occurrence marks for duplicated truth labels
// (a duplicate counts in #true, like the reference, but once elsewhere).
// ---------------------------------------------------------------------------

__device__ __forceinline__ void row_range(const int64_t* indptr, int64_t row, int64_t nnz, int64_t& b, int64_t& e) {
  b = min(max(indptr[row], int64_t{0}), nnz);
  e = min(max(indptr[row + 1], b), nnz);
}

__global__ void validate_csr_kernel(const int64_t* __restrict__ indptr, const int64_t* __restrict__ indices,
                                    int64_t R, int64_t nnz, int64_t n_total, uint8_t* __restrict__ dup,
                                    int* __restrict__ flags) {
  const int lane = threadIdx.x & 31;
  if (blockIdx.x == 0 && threadIdx.x == 0 && (indptr[0] != 0 || indptr[R] != nnz)) flags[kBadEnds] = 1;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < R;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    if (lane == 0 && indptr[row + 1] < indptr[row]) flags[kDecreasing] = 1;
    int64_t b, e;
    row_range(indptr, row, nnz, b, e);
    for (int64_t i = b + lane; i < e; i += 32) {
      const int64_t v = indices[i];
      if (v < 0) flags[kNegative] = 1;
      if (v >= n_total) flags[kTooLarge] = 1;
      bool seen = false;
      for (int64_t f = b; f < i && !seen; ++f) seen = indices[f] == v;
      dup[i] = seen;
    }
  }
}

// ---------------------------------------------------------------------------
// Metrics of one row over 32 consecutive ranks c0 + lane.
// ---------------------------------------------------------------------------

struct Truth {
  const int64_t* indptr;
  const int64_t* indices;
  const uint8_t* dup;
  int64_t nnz;
  const double* ip;  // inverse propensities, nullptr without
  int64_t ip_n;
  const double* disc;  // disc[r] = 1 / log2(r + 2), r < k
  const double* idcg;  // idcg[m] = sum_{r < m} disc[r], m <= k
  int k;

  __device__ double ip_at(int64_t label) const { return (label >= 0 && label < ip_n) ? ip[label] : 0.0; }
};

struct Carry {  // running totals of a row before rank c0
  double hits = 0, dcg = 0, psp = 0, best = 0;
};

__device__ __forceinline__ double scan_incl(double v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double u = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// disc[r] = 1 / log2(r + 2) for r < k, disc[k] = 0; idcg[m] = sum_{r < m} disc[r] for m <= k. One warp.
__global__ void __launch_bounds__(32) rank_tables_kernel(double* __restrict__ disc, double* __restrict__ idcg, int k) {
  const int lane = threadIdx.x;
  double carry = 0.0;
  if (lane == 0) idcg[0] = 0.0;
  for (int c0 = 0; c0 < k; c0 += 32) {
    const int r = c0 + lane;
    const double d = r < k ? 1.0 / log2(static_cast<double>(r) + 2.0) : 0.0;
    const double sum = carry + scan_incl(d, lane);
    if (r < k) {
      disc[r] = d;
      idcg[r + 1] = sum;
    }
    carry = __shfl_sync(kFullMask, sum, 31);
  }
  if (lane == 0) disc[k] = 0.0;
}

// label: the label ranked c0 + lane (ignored past k). best_buf: 32 doubles of
// shared memory owned by the warp. out: the row's four metrics at that rank.
__device__ void rank_metrics(const Truth& tr, int64_t row, int c0, int label, Carry& carry, double* best_buf,
                             double (&out)[4]) {
  const int lane = threadIdx.x & 31;
  const int rank = c0 + lane;
  const bool valid = rank < tr.k;
  int64_t b, e;
  row_range(tr.indptr, row, tr.nnz, b, e);
  const int64_t n_true = e - b;

  bool hit = false;
  for (int64_t i = b; i < e; ++i) hit |= tr.indices[i] == label;  // same address for every lane
  hit = hit && valid;
  const double hits = carry.hits + scan_incl(hit ? 1.0 : 0.0, lane);
  const double dcg = carry.dcg + scan_incl(hit ? tr.disc[rank] : 0.0, lane);
  const double psp = carry.psp + scan_incl(hit && tr.ip != nullptr ? tr.ip_at(label) : 0.0, lane);
  double best = carry.best;
  if (tr.ip != nullptr) {
    // The value ranked c0 + lane among the row's distinct true labels,
    // ordered by inv_prop (descending), entry position breaking ties.
    best_buf[lane] = 0.0;
    __syncwarp();
    for (int64_t i = b + lane; i < e; i += 32) {
      if (tr.dup[i]) continue;
      const double v = tr.ip_at(tr.indices[i]);
      int64_t pos = 0;
      for (int64_t f = b; f < e; ++f) {
        if (tr.dup[f]) continue;
        const double vf = tr.ip_at(tr.indices[f]);
        pos += (vf > v || (vf == v && f < i)) ? 1 : 0;
      }
      if (pos >= c0 && pos < c0 + 32) best_buf[pos - c0] = v;
    }
    __syncwarp();
    best += scan_incl(best_buf[lane], lane);
    __syncwarp();  // best_buf is rewritten by the next call
  }
  const int m = static_cast<int>(min(static_cast<int64_t>(rank) + 1, n_true));
  out[0] = hits;
  out[1] = (valid && n_true > 0) ? dcg / tr.idcg[m] : 0.0;
  out[2] = psp;
  out[3] = best;
  carry.hits = __shfl_sync(kFullMask, hits, 31);
  carry.dcg = __shfl_sync(kFullMask, dcg, 31);
  carry.psp = __shfl_sync(kFullMask, psp, 31);
  carry.best = __shfl_sync(kFullMask, best, 31);
}

// ---------------------------------------------------------------------------
// k <= 32: selection and metrics in one pass over the scores.
// ---------------------------------------------------------------------------

template <typename K>
__device__ __forceinline__ bool better(K a, int ia, K b, int ib) {
  return a > b || (a == b && ia < ib);
}

template <typename T>
__device__ __forceinline__ float key_of(T x) {
  return to_float(x);
}
__device__ __forceinline__ double key_of(double x) { return x; }

template <typename K, int KMAX>
__device__ __forceinline__ void offer(K (&s)[KMAX], int (&id)[KMAX], K x, int l) {
  if (!better(x, l, s[KMAX - 1], id[KMAX - 1])) return;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {  // carry x down the sorted list
    if (better(x, l, s[j], id[j])) {
      const K ts = s[j];
      const int ti = id[j];
      s[j] = x;
      id[j] = l;
      x = ts;
      l = ti;
    }
  }
}

// Offers the scores of one 16-byte piece, labels l0, l0 + 1, ...; whether one was NaN.
template <typename T, typename K, int KMAX>
__device__ __forceinline__ bool offer_piece(K (&s)[KMAX], int (&id)[KMAX], const uint4& raw, int l0) {
  constexpr int V = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&raw);
  bool nan = false;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const K x = key_of(e[i]);
    nan |= x != x;
    offer(s, id, x, l0 + i);
  }
  return nan;
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(kWarps * 32)
    topk_fast_kernel(const T* __restrict__ scores, int64_t R, int L, Truth tr, int64_t* __restrict__ topk,
                     double* __restrict__ ws, int* __restrict__ flags) {
  using K = decltype(key_of(T{}));
  constexpr int V = 16 / sizeof(T);  // scores a 16-byte load
  __shared__ double red[kWarps][4][32];
  __shared__ double best_buf[kWarps][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k = tr.k;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  bool nan = false;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < R;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* sr = scores + row * L;
    K s[KMAX];
    int id[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      s[j] = -std::numeric_limits<K>::infinity();
      id[j] = kNoLabel;
    }
    // The labels before the row's first 16-byte boundary, then 16-byte loads (two in flight a lane,
    // lane j holding labels head + V j ..), then the rest. Which lane offers a label changes nothing:
    // each keeps its best KMAX in the strict order of `better`.
    const int head = static_cast<int>(min(static_cast<int64_t>(L), static_cast<int64_t>(
        ((16 - (reinterpret_cast<std::uintptr_t>(sr) & 15)) & 15) / sizeof(T))));
    if (lane < head) {
      const K x = key_of(sr[lane]);
      nan |= x != x;
      offer(s, id, x, lane);
    }
    const int nvec = (L - head) / V;
    const uint4* sv = reinterpret_cast<const uint4*>(sr + head);
    int j = lane;
    for (; j + 32 < nvec; j += 64) {
      const uint4 a = __ldg(sv + j), b = __ldg(sv + j + 32);
      nan |= offer_piece<T>(s, id, a, head + j * V);
      nan |= offer_piece<T>(s, id, b, head + (j + 32) * V);
    }
    for (; j < nvec; j += 32) nan |= offer_piece<T>(s, id, __ldg(sv + j), head + j * V);
    for (int l = head + nvec * V + lane; l < L; l += 32) {
      const K x = key_of(sr[l]);
      nan |= x != x;
      offer(s, id, x, l);
    }

    int mine = kNoLabel;  // the label at rank `lane`
    for (int r = 0; r < k; ++r) {
      K bs = s[0];
      int bi = id[0];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const K os = __shfl_xor_sync(kFullMask, bs, o);
        const int oi = __shfl_xor_sync(kFullMask, bi, o);
        if (better(os, oi, bs, bi)) {
          bs = os;
          bi = oi;
        }
      }
      if (id[0] == bi) {  // label ids are unique: exactly one lane pops
#pragma unroll
        for (int j = 0; j + 1 < KMAX; ++j) {
          s[j] = s[j + 1];
          id[j] = id[j + 1];
        }
        s[KMAX - 1] = -std::numeric_limits<K>::infinity();
        id[KMAX - 1] = kNoLabel;
      }
      if (lane == r) mine = bi;
    }
    if (lane < k) topk[row * k + lane] = mine;

    Carry carry;
    double out[4];
    rank_metrics(tr, row, 0, mine, carry, best_buf[warp], out);
    if (lane < k) {
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[m] += out[m];
    }
  }

  if (__any_sync(kFullMask, nan) && lane == 0) flags[kNaN] = 1;
#pragma unroll
  for (int m = 0; m < 4; ++m) red[warp][m][lane] = acc[m];
  __syncthreads();
  if (warp == 0 && lane < k) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      double v = 0.0;
      for (int w = 0; w < kWarps; ++w) v += red[w][m][lane];
      ws[(static_cast<int64_t>(blockIdx.x) * 4 + m) * k + lane] = v;
    }
  }
}

// ---------------------------------------------------------------------------
// k > 32: metrics of given top-k lists. One warp a block; ws [blocks, 4, k]
// zero-initialised, each block owning its slice.
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(32) metrics_kernel(const int64_t* __restrict__ topk, int64_t R, Truth tr,
                                                     double* __restrict__ ws) {
  __shared__ double best_buf[32];
  const int lane = threadIdx.x;
  const int k = tr.k;
  double* mine = ws + static_cast<int64_t>(blockIdx.x) * 4 * k;
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    Carry carry;
    for (int c0 = 0; c0 < k; c0 += 32) {
      const int rank = c0 + lane;
      const int label = rank < k ? static_cast<int>(topk[row * k + rank]) : kNoLabel;
      double out[4];
      rank_metrics(tr, row, c0, label, carry, best_buf, out);
      if (rank < k) {
#pragma unroll
        for (int m = 0; m < 4; ++m) mine[static_cast<int64_t>(m) * k + rank] += out[m];
      }
    }
  }
}

template <typename Fn>
void dispatch_score_types(at::ScalarType st, Fn&& fn) {
  if (st == at::kDouble) {
    fn(TypeTag<double>{});
  } else {
    dispatch_float_types(st, "topk_metrics", fn);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_metrics_cuda(const at::Tensor& scores_, const at::Tensor& indptr_,
                                                     const at::Tensor& indices_, int64_t k,
                                                     const std::optional<at::Tensor>& inv_prop_) {
  checks::topk_metrics_inputs(scores_, indptr_, indices_, k, inv_prop_);
  const int64_t R = scores_.size(0), L = scores_.size(1);
  TORCH_CHECK_VALUE(L < kNoLabel, "topk_metrics: L must be below 2^31 - 1 on CUDA, got ", L);
  const auto st = scores_.scalar_type();

  const c10::cuda::CUDAGuard guard(scores_.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Device dev = scores_.device();
  const at::Tensor scores = scores_.contiguous();
  // The truth may live on the host (it usually does): copy it over once.
  const at::Tensor indptr = indptr_.to(dev, at::kLong).contiguous();
  const at::Tensor indices = indices_.to(dev, at::kLong).contiguous();
  const int64_t nnz = indices.numel();
  at::Tensor ip;
  int64_t n_total = L;
  if (inv_prop_.has_value()) {
    ip = inv_prop_->to(dev, at::kDouble).contiguous();
    n_total = std::max(L, ip.numel());
  }

  // Rank discounts, computed on the device in float64: a copy from the host would wait for the stream.
  const at::Tensor tables = scores.new_empty({2, k + 1}, scores.options().dtype(at::kDouble));
  rank_tables_kernel<<<1, 32, 0, stream>>>(tables.mutable_data_ptr<double>(),
                                           tables.mutable_data_ptr<double>() + (k + 1), static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor flags = scores.new_zeros({kFlags}, scores.options().dtype(at::kInt));
  at::Tensor dup = scores.new_zeros({std::max<int64_t>(nnz, 1)}, scores.options().dtype(at::kByte));
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, scores.get_device());
  {
    const int64_t blocks = std::clamp<int64_t>(ceil_div(R, kWarps), 1, 8 * sms);
    validate_csr_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
        indptr.const_data_ptr<int64_t>(), indices.const_data_ptr<int64_t>(), R, nnz, n_total,
        dup.mutable_data_ptr<uint8_t>(), flags.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const Truth tr{indptr.const_data_ptr<int64_t>(),
                 indices.const_data_ptr<int64_t>(),
                 dup.const_data_ptr<uint8_t>(),
                 nnz,
                 ip.defined() ? ip.const_data_ptr<double>() : nullptr,
                 ip.defined() ? ip.numel() : 0,
                 tables.const_data_ptr<double>(),
                 tables.const_data_ptr<double>() + (k + 1),
                 static_cast<int>(k)};
  at::Tensor topk;
  at::Tensor ws;
  if (R == 0) {
    topk = scores.new_empty({0, k}, scores.options().dtype(at::kLong));
    ws = scores.new_zeros({1, 4, k}, scores.options().dtype(at::kDouble));
  } else if (k <= 32) {
    topk = scores.new_empty({R, k}, scores.options().dtype(at::kLong));
    const int64_t blocks = std::clamp<int64_t>(ceil_div(R, kWarps), 1, 8 * sms);
    ws = scores.new_empty({blocks, 4, k}, scores.options().dtype(at::kDouble));
    dispatch_score_types(st, [&](auto tag) {
      using T = typename decltype(tag)::type;
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
            cptr<T>(scores), R, static_cast<int>(L), tr, topk.mutable_data_ptr<int64_t>(),
            ws.mutable_data_ptr<double>(), flags.mutable_data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (k <= 8) {
        launch(topk_fast_kernel<T, 8>);
      } else {
        launch(topk_fast_kernel<T, 32>);
      }
    });
  } else {
    // Stable sort: equal scores keep the lower label first.
    topk = std::get<1>(scores.sort(std::optional<bool>(true), 1, true)).narrow(1, 0, k).contiguous();
    if (scores.isnan().any().item().toBool()) flags.select(0, kNaN).fill_(1);
    // Buffer of at most ~32 MB: blocks x 4 x k doubles.
    const int64_t blocks = std::clamp<int64_t>((int64_t{1} << 20) / (4 * k), 1, std::min<int64_t>(R, 8 * sms));
    ws = scores.new_zeros({blocks, 4, k}, scores.options().dtype(at::kDouble));
    metrics_kernel<<<static_cast<unsigned>(blocks), 32, 0, stream>>>(topk.const_data_ptr<int64_t>(), R, tr,
                                                                     ws.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const at::Tensor f = flags.cpu();  // the one synchronisation
  const int* fl = f.const_data_ptr<int>();
  checks::topk_metrics_values(fl[kBadEnds], fl[kDecreasing], fl[kNegative], fl[kTooLarge], fl[kNaN], nnz, n_total);

  at::Tensor sums = ws.sum(0);
  return {sums, topk};
}

}  // namespace xmcnas_fast::cuda
