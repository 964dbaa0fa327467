// The steps between the matrix products of label_attention's matrix-product
// path (../label_attention_gemm.{h,cpp}), for one block of n labels. The
// scores s [B, N, n] hold, for each batch row b and label l, a column of N
// token scores at stride n: a warp takes 32 neighbouring labels, so that each
// of its reads is one coalesced line across a row of s.
//
//   softmax   one read of a column finds its max and sum (online, split over
//             kGroups token groups combined in shared memory), a second writes
//             P = exp(s - lse) in the output dtype, 0 on padding;
//   backward  elementwise: P = exp(s - lse), dS = P (dp - delta).
//
// Math in acc_t of the scores (float32, float64 for float64 scores).
#include <algorithm>
#include <limits>
#include <tuple>

#include "../label_attention_gemm.h"
#include "common.cuh"

namespace xmcnas_fast::cuda {
namespace {

constexpr int kCols = 32;    // labels per thread block (one warp wide)
constexpr int kGroups = 8;   // token groups per column: group g reads tokens g, g + kGroups, ...

template <typename S, typename P>
__global__ void __launch_bounds__(kCols * kGroups) block_softmax_kernel(
    const S* s, const bool* __restrict__ mask, P* p, float* __restrict__ lse, int64_t lse_stride, int N, int n,
    int col_tiles) {
  using A = acc_t<S>;
  const A inf = std::numeric_limits<A>::infinity();
  const int b = blockIdx.x / col_tiles;
  const int l = (blockIdx.x % col_tiles) * kCols + threadIdx.x;
  const int g = threadIdx.y;
  const bool real_col = l < n;
  const S* sb = s + static_cast<int64_t>(b) * N * n + l;
  P* pb = p + static_cast<int64_t>(b) * N * n + l;
  const bool* mb = mask + static_cast<int64_t>(b) * N;

  A m = -inf, z = 0;  // running max and sum of exp(x - m) over this group's real tokens
  if (real_col) {
    for (int t = g; t < N; t += kGroups) {
      if (!mb[t]) continue;
      const A x = to_acc(sb[static_cast<int64_t>(t) * n]);
      if (x > m) {
        z = z * exp_acc(m - x) + A(1);
        m = x;
      } else {
        z += exp_acc(x - m);  // NaN stays NaN
      }
    }
  }
  __shared__ A sm[kGroups][kCols], sz[kGroups][kCols];
  sm[g][threadIdx.x] = m;
  sz[g][threadIdx.x] = z;
  __syncthreads();
  A M = -inf;
#pragma unroll
  for (int i = 0; i < kGroups; ++i) M = sm[i][threadIdx.x] > M ? sm[i][threadIdx.x] : M;
  A Z = 0;
#pragma unroll
  for (int i = 0; i < kGroups; ++i) Z += sz[i][threadIdx.x] * exp_acc(sm[i][threadIdx.x] - M);
  // No real token: M = -inf, lse = +inf and every P = 0. A NaN in a group's sum reaches Z and lse.
  const A lse_l = M == -inf ? inf : M + log_acc(Z);
  if (!real_col) return;
  if (g == 0) lse[static_cast<int64_t>(b) * lse_stride + l] = static_cast<float>(lse_l);
  for (int t = g; t < N; t += kGroups) {
    const int64_t i = static_cast<int64_t>(t) * n;
    pb[i] = from_acc<P>(mb[t] ? exp_acc(to_acc(sb[i]) - lse_l) : A(0));
  }
}

template <typename S, typename P>
__global__ void block_softmax_backward_kernel(const S* s, const S* dp, const bool* __restrict__ mask,
                                              const float* __restrict__ lse, int64_t lse_stride,
                                              const S* __restrict__ delta, P* p, P* ds, int N, int n,
                                              int64_t total) {
  using A = acc_t<S>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / n;  // b * N + t
    const int64_t l = i - row * n;
    const int64_t b = row / N;
    const A pr = mask[row] ? exp_acc(to_acc(s[i]) - static_cast<A>(lse[b * lse_stride + l])) : A(0);
    const A d = pr * (to_acc(dp[i]) - to_acc(delta[b * n + l]));
    p[i] = from_acc<P>(pr);
    ds[i] = from_acc<P>(d);
  }
}

// Calls fn(TypeTag<S>{}, TypeTag<P>{}) for scores s's dtype and the output dtype `out`.
template <typename Fn>
void dispatch_scores_and_out(const at::Tensor& s, at::ScalarType out, Fn&& fn) {
  if (s.scalar_type() == at::kDouble) {
    TORCH_CHECK(out == at::kDouble, "label_attention (matrix-product path): float64 scores give float64");
    fn(TypeTag<double>{}, TypeTag<double>{});
    return;
  }
  TORCH_CHECK(s.scalar_type() == at::kFloat, "label_attention (matrix-product path): scores must be float32");
  dispatch_float_types(out, "label_attention", [&](auto tag) { fn(TypeTag<float>{}, tag); });
}

void check_block(const at::Tensor& s, const at::Tensor& mask, const at::Tensor& lse) {
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
                  mask.size(0) == s.size(0) && mask.size(1) == s.size(1),
              "label_attention (matrix-product path): bad block of scores");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.size(0) == s.size(0) && lse.size(1) == s.size(2) &&
                  (lse.size(1) <= 1 || lse.stride(1) == 1),
              "label_attention (matrix-product path): bad log-sum-exp view");
  TORCH_CHECK(s.size(1) <= std::numeric_limits<int>::max() && s.size(2) <= std::numeric_limits<int>::max(),
              "label_attention (matrix-product path): block too large");
}

}  // namespace

at::Tensor gemm_block_softmax(const at::Tensor& s, const at::Tensor& mask, at::ScalarType out,
                              const at::Tensor& lse_out) {
  check_block(s, mask, lse_out);
  at::Tensor p = out == s.scalar_type() ? s : s.new_empty(s.sizes(), s.options().dtype(out));
  const int64_t B = s.size(0), N = s.size(1), n = s.size(2);
  if (s.numel() == 0) return p;
  const int64_t col_tiles = ceil_div(n, kCols);
  TORCH_CHECK(B * col_tiles <= std::numeric_limits<int>::max(), "label_attention (matrix-product path): grid too large");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_scores_and_out(s, out, [&](auto s_tag, auto p_tag) {
    using S = typename decltype(s_tag)::type;
    using P = typename decltype(p_tag)::type;
    block_softmax_kernel<S, P><<<static_cast<unsigned>(B * col_tiles), dim3(kCols, kGroups), 0, stream>>>(
        cptr<S>(s), mask.const_data_ptr<bool>(), mptr<P>(p), lse_out.mutable_data_ptr<float>(), lse_out.stride(0),
        static_cast<int>(N), static_cast<int>(n), static_cast<int>(col_tiles));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

std::tuple<at::Tensor, at::Tensor> gemm_block_softmax_backward(const at::Tensor& s, const at::Tensor& dp,
                                                               const at::Tensor& mask, const at::Tensor& lse,
                                                               const at::Tensor& delta, at::ScalarType out) {
  check_block(s, mask, lse);
  TORCH_CHECK(dp.sizes() == s.sizes() && dp.is_contiguous() && dp.scalar_type() == s.scalar_type() &&
                  delta.scalar_type() == s.scalar_type() && delta.is_contiguous() && delta.size(0) == s.size(0) &&
                  delta.size(1) == s.size(2),
              "label_attention (matrix-product path): bad score gradients");
  const bool in_place = out == s.scalar_type();
  at::Tensor p = in_place ? s : s.new_empty(s.sizes(), s.options().dtype(out));
  at::Tensor ds = in_place ? dp : s.new_empty(s.sizes(), s.options().dtype(out));
  const int64_t total = s.numel();
  if (total == 0) return {p, ds};
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t{1} << 20);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_scores_and_out(s, out, [&](auto s_tag, auto p_tag) {
    using S = typename decltype(s_tag)::type;
    using P = typename decltype(p_tag)::type;
    block_softmax_backward_kernel<S, P><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        cptr<S>(s), cptr<S>(dp), mask.const_data_ptr<bool>(), lse.const_data_ptr<float>(), lse.stride(0),
        cptr<S>(delta), mptr<P>(p), mptr<P>(ds), static_cast<int>(s.size(1)), static_cast<int>(s.size(2)), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p, ds};
}

}  // namespace xmcnas_fast::cuda
