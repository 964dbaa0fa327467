// label_attention over each document's own shortlist of labels, on CUDA:
//   ctx[b,k] = sum_n softmax_n(W[l] . h[b,n] over real tokens) u_n,   l = labels[b,k]
//   lse[b,k] = log sum_n exp(W[l] . h[b,n])   (+inf for a padding slot, l = -1, or a row without
//   real tokens; ctx = 0 there)
// with values u_n = v[b,n] (width Dv), or h[b,n] itself (Dv = D).
//
// Backward, with p = exp(s - lse), delta[b,k] = grad_ctx[b,k] . ctx[b,k]:
//   ds              = p (grad_ctx[b,k] . u_n - delta[b,k])
//   grad_rows[b,k]  = sum_n ds h[b,n]          (the gradient of the row W[l] from this slot alone)
//   grad_h[b,n]     = sum_k ds W[l]  (+ sum_k p grad_ctx[b,k] when u = h)
//   grad_v[b,n]     = sum_k p grad_ctx[b,k]
// One warp per slot (forward, grad_rows) or per token (grad_h, grad_v): every output element is
// written by one warp, nothing is atomic, so the gradients are bitwise reproducible, and the scores
// are recomputed rather than stored (no [B,K,N] tensor). The warp's lanes hold a slice of 32 NV
// output columns in registers; a wider output takes several slices, the scores recomputed for each.
// Dot products are lane-strided and summed with shuffles. Accumulation is float32 (float64 for
// float64 inputs). These are SIMT kernels for every dtype: at a shortlist's sizes (K about 1,000
// labels a document) the work per document is small and the rows of W are gathered, so the label
// dimension has no shared tile that the dense op's tensor-core and cuBLAS paths rely on.
#include <ATen/ops/aminmax.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace xmcnas_fast::cuda::shortlist {
namespace {

constexpr int kWarps = 8;  // warps per block
template <typename T>
constexpr int kNV = sizeof(T) == 8 ? 4 : 8;  // columns per lane per slice

unsigned blocks_for(int64_t warps) {
  const int64_t blocks = ceil_div(warps, kWarps);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "label_attention_shortlist: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// x . y over n elements, summed over the warp (every lane gets the sum).
template <typename T, typename U>
__device__ __forceinline__ acc_t<T> warp_dot(const T* x, const U* y, int n, int lane) {
  acc_t<T> s = 0;
  for (int d = lane; d < n; d += 32) s += to_acc(x[d]) * to_acc(y[d]);
  return warp_sum(s);
}

// delta[r] = grad_ctx[r] . ctx[r] over Dv, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    delta_kernel(const T* __restrict__ go, const T* __restrict__ ctx, acc_t<T>* __restrict__ delta, int64_t rows,
                 int Dv) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const acc_t<T> s = warp_dot(go + r * Dv, ctx + r * Dv, Dv, lane);
  if (lane == 0) delta[r] = s;
}

// One warp per slot (b, k): the context over the real tokens of row b, an online softmax, slice by slice.
template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    forward_kernel(const T* __restrict__ h, const T* __restrict__ vals, const bool* __restrict__ mask,
                   const T* __restrict__ W, const int64_t* __restrict__ labels, T* __restrict__ ctx,
                   float* __restrict__ lse, int64_t slots, int K, int N, int D, int Dv) {
  using A = acc_t<T>;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (slot >= slots) return;
  const int64_t b = slot / K, l = labels[slot];
  T* out = ctx + slot * Dv;
  const T* wl = W + (l < 0 ? 0 : l) * D;
  for (int d0 = 0; d0 < Dv; d0 += 32 * NV) {
    A m = -std::numeric_limits<A>::infinity(), sum = 0, acc[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] = 0;
    for (int n = 0; l >= 0 && n < N; ++n) {
      if (!mask[b * N + n]) continue;  // the same n for the whole warp: no divergence
      const int64_t tok = b * N + n;
      const A s = warp_dot(wl, h + tok * D, D, lane);
      const A m_new = max_acc(m, s);
      const A scale = exp_acc(m - m_new), p = exp_acc(s - m_new);
      sum = sum * scale + p;
      m = m_new;
      const T* u = vals + tok * Dv;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        acc[i] = acc[i] * scale + (d < Dv ? p * to_acc(u[d]) : A(0));
      }
    }
    const A inv = sum > 0 ? A(1) / sum : A(0);  // a padding slot or a row without real tokens: zeros
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int d = d0 + lane + 32 * i;
      if (d < Dv) out[d] = from_acc<T>(acc[i] * inv);
    }
    if (d0 == 0 && lane == 0)
      lse[slot] = sum > 0 ? static_cast<float>(m + log_acc(sum)) : std::numeric_limits<float>::infinity();
  }
}

// One warp per slot (b, k): grad_rows[b,k] = sum_n ds h[b,n], slice by slice over D.
template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    rows_kernel(const T* __restrict__ go, const T* __restrict__ h, const T* __restrict__ vals,
                const bool* __restrict__ mask, const T* __restrict__ W, const int64_t* __restrict__ labels,
                const float* __restrict__ lse, const acc_t<T>* __restrict__ delta, T* __restrict__ grad_rows,
                int64_t slots, int K, int N, int D, int Dv) {
  using A = acc_t<T>;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (slot >= slots) return;
  const int64_t b = slot / K, l = labels[slot];
  const T* wl = W + (l < 0 ? 0 : l) * D;
  const T* g = go + slot * Dv;
  const A ls = static_cast<A>(lse[slot]), dl = delta[slot];
  const bool live = l >= 0 && ls < std::numeric_limits<A>::infinity();
  for (int d0 = 0; d0 < D; d0 += 32 * NV) {
    A acc[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) acc[i] = 0;
    for (int n = 0; live && n < N; ++n) {
      if (!mask[b * N + n]) continue;
      const int64_t tok = b * N + n;
      const T* hn = h + tok * D;
      const A p = exp_acc(warp_dot(wl, hn, D, lane) - ls);
      const A ds = p * (warp_dot(g, vals + tok * Dv, Dv, lane) - dl);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        if (d < D) acc[i] += ds * to_acc(hn[d]);
      }
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int d = d0 + lane + 32 * i;
      if (d < D) grad_rows[slot * D + d] = from_acc<T>(acc[i]);
    }
  }
}

// One warp per token (b, n), real ones only (padding keeps its zeros): grad_h[b,n] = sum_k ds W[l]
// (+ sum_k p grad_ctx[b,k] when the values are h), then with separate values grad_v[b,n] =
// sum_k p grad_ctx[b,k]; slice by slice over D, then over Dv.
template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    tokens_kernel(const T* __restrict__ go, const T* __restrict__ h, const T* __restrict__ vals,
                  bool values_are_h, const bool* __restrict__ mask, const T* __restrict__ W,
                  const int64_t* __restrict__ labels, const float* __restrict__ lse,
                  const acc_t<T>* __restrict__ delta, T* __restrict__ grad_h, T* __restrict__ grad_v,
                  int64_t tokens, int K, int N, int D, int Dv) {
  using A = acc_t<T>;
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (tok >= tokens || !mask[tok]) return;
  const int64_t b = tok / N;
  const T* hn = h + tok * D;
  const T* un = vals + tok * Dv;
  // pass 0: grad_h over D; pass 1 (separate values only): grad_v over Dv
  for (int pass = 0; pass < (values_are_h ? 1 : 2); ++pass) {
    const int E = pass == 0 ? D : Dv;
    T* out = (pass == 0 ? grad_h + tok * D : grad_v + tok * Dv);
    for (int d0 = 0; d0 < E; d0 += 32 * NV) {
      A acc[NV];
#pragma unroll
      for (int i = 0; i < NV; ++i) acc[i] = 0;
      for (int k = 0; k < K; ++k) {
        const int64_t slot = b * K + k, l = labels[slot];
        if (l < 0) continue;
        const T* wl = W + l * D;
        const T* g = go + slot * Dv;
        const A p = exp_acc(warp_dot(wl, hn, D, lane) - static_cast<A>(lse[slot]));
        if (pass == 0) {
          const A ds = p * (warp_dot(g, un, Dv, lane) - delta[slot]);
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            const int d = d0 + lane + 32 * i;
            if (d < D) acc[i] += ds * to_acc(wl[d]) + (values_are_h ? p * to_acc(g[d]) : A(0));
          }
        } else {
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            const int d = d0 + lane + 32 * i;
            if (d < Dv) acc[i] += p * to_acc(g[d]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        if (d < E) out[d] = from_acc<T>(acc[i]);
      }
    }
  }
}

struct Inputs {
  at::Tensor h, mask, W, labels, v;  // contiguous; v undefined without separate values
  int64_t B, N, D, Dv, K, L;
  bool has_v() const { return v.defined(); }
  const at::Tensor& values() const { return has_v() ? v : h; }
};

// The checks of csrc/checks.h, the label ids' range (one reduction, read back by the host), sizes that fit
// the kernels' ints.
Inputs prepare(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, const at::Tensor& labels,
               const std::optional<at::Tensor>& v) {
  const int64_t lim = std::numeric_limits<int>::max();
  const int64_t Dv = v ? v->size(2) : h.size(2);
  TORCH_CHECK_VALUE(h.size(1) < lim && h.size(2) < lim && labels.size(1) < lim && Dv < lim,
                    "label_attention_shortlist: N, D, Dv and K must be below 2^31 on CUDA");
  Inputs in{h.contiguous(), mask.contiguous(), W.contiguous(), labels.contiguous(), v ? v->contiguous() : at::Tensor(),
            h.size(0), h.size(1), h.size(2), Dv, labels.size(1), W.size(0)};
  if (in.labels.numel() > 0) {
    const auto [lo, hi] = at::aminmax(in.labels);
    checks::label_attention_shortlist_values(lo.item<int64_t>() < -1 || hi.item<int64_t>() >= in.L, in.L);
  }
  return in;
}

}  // namespace
}  // namespace xmcnas_fast::cuda::shortlist

namespace xmcnas_fast::cuda {
using namespace shortlist;

std::tuple<at::Tensor, at::Tensor> label_attention_shortlist_cuda(const at::Tensor& h_, const at::Tensor& mask_,
                                                                  const at::Tensor& W_, const at::Tensor& labels_,
                                                                  const std::optional<at::Tensor>& v_,
                                                                  bool /*sparse_grad: autograd's*/) {
  checks::label_attention_shortlist_inputs(h_, mask_, W_, labels_, v_);
  const c10::cuda::CUDAGuard guard(h_.device());
  const Inputs in = prepare(h_, mask_, W_, labels_, v_);
  at::Tensor ctx = in.h.new_empty({in.B, in.K, in.Dv});
  at::Tensor lse = in.h.new_empty({in.B, in.K}, in.h.options().dtype(at::kFloat));
  const int64_t slots = in.B * in.K;
  if (slots == 0 || in.Dv == 0) {
    lse.fill_(std::numeric_limits<float>::infinity());
    return {ctx, lse};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types_and_double(in.h.scalar_type(), "label_attention_shortlist", [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_kernel<T, kNV<T>><<<blocks_for(slots), kWarps * 32, 0, stream>>>(
        cptr<T>(in.h), cptr<T>(in.values()), in.mask.const_data_ptr<bool>(), cptr<T>(in.W),
        in.labels.const_data_ptr<int64_t>(), mptr<T>(ctx), lse.mutable_data_ptr<float>(), slots,
        static_cast<int>(in.K), static_cast<int>(in.N), static_cast<int>(in.D), static_cast<int>(in.Dv));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ctx, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_shortlist_backward_cuda(
    const at::Tensor& grad_ctx_, const at::Tensor& h_, const at::Tensor& mask_, const at::Tensor& W_,
    const at::Tensor& labels_, const std::optional<at::Tensor>& v_, const at::Tensor& ctx_, const at::Tensor& lse_) {
  checks::label_attention_shortlist_inputs(h_, mask_, W_, labels_, v_);
  checks::label_attention_shortlist_saved(h_, labels_, v_, grad_ctx_, ctx_, lse_);
  const c10::cuda::CUDAGuard guard(h_.device());
  const Inputs in = prepare(h_, mask_, W_, labels_, v_);
  const at::Tensor go = grad_ctx_.contiguous(), ctx = ctx_.contiguous(), lse = lse_.contiguous();
  at::Tensor grad_h = in.h.new_zeros(in.h.sizes());  // padding tokens get no gradient
  at::Tensor grad_rows = in.h.new_zeros({in.B, in.K, in.D});
  at::Tensor grad_v = in.has_v() ? in.v.new_zeros(in.v.sizes()) : in.h.new_empty({0});
  const int64_t slots = in.B * in.K, tokens = in.B * in.N;
  if (slots == 0 || tokens == 0) return {grad_h, grad_rows, grad_v};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int K = static_cast<int>(in.K), N = static_cast<int>(in.N), D = static_cast<int>(in.D),
            Dv = static_cast<int>(in.Dv);
  at::Tensor delta = in.h.new_empty({in.B, in.K}, in.h.options().dtype(acc_scalar_type(in.h.scalar_type())));
  dispatch_float_types_and_double(in.h.scalar_type(), "label_attention_shortlist_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    delta_kernel<T><<<blocks_for(slots), kWarps * 32, 0, stream>>>(cptr<T>(go), cptr<T>(ctx), mptr<acc_t<T>>(delta),
                                                                   slots, Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rows_kernel<T, kNV<T>><<<blocks_for(slots), kWarps * 32, 0, stream>>>(
        cptr<T>(go), cptr<T>(in.h), cptr<T>(in.values()), in.mask.const_data_ptr<bool>(), cptr<T>(in.W),
        in.labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), cptr<acc_t<T>>(delta), mptr<T>(grad_rows),
        slots, K, N, D, Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tokens_kernel<T, kNV<T>><<<blocks_for(tokens), kWarps * 32, 0, stream>>>(
        cptr<T>(go), cptr<T>(in.h), cptr<T>(in.values()), !in.has_v(), in.mask.const_data_ptr<bool>(),
        cptr<T>(in.W), in.labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), cptr<acc_t<T>>(delta),
        mptr<T>(grad_h), in.has_v() ? mptr<T>(grad_v) : nullptr, tokens, K, N, D, Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_h, grad_rows, grad_v};
}

}  // namespace xmcnas_fast::cuda
