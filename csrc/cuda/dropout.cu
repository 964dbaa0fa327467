// Inverted dropout, optionally fused after a ReLU, on CUDA: the same
// counter-based mask as the CPU kernel (dropout_mask.h), so both devices drop
// the same elements for the same seed. Elementwise, grid-stride.
#include <algorithm>

#include "../checks.h"
#include "../dropout_mask.h"
#include "common.cuh"
#include "ops.cuh"

namespace xmcnas_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, uint64_t seed, uint32_t thr,
                   acc_t<T> scale, bool relu) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    A v = to_acc(x[i]);
    if (relu && v < A(0)) v = A(0);
    y[i] = from_acc<T>(dropout_keep(seed, static_cast<uint64_t>(i), thr) ? v * scale : A(0));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_backward_kernel(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ out, int64_t n,
                            uint64_t seed, uint32_t thr, acc_t<T> scale, bool relu) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const bool flows = relu ? to_acc(y[i]) > A(0) : dropout_keep(seed, static_cast<uint64_t>(i), thr);
    out[i] = from_acc<T>(flows ? to_acc(g[i]) * scale : A(0));
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

uint64_t check(const char* op, const at::Tensor& x, double p, const at::Tensor& seed) {
  checks::dropout_inputs(op, x, p, seed);
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

}  // namespace

at::Tensor dropout_cuda(const at::Tensor& x_, double p, const at::Tensor& seed_, bool relu) {
  const uint64_t seed = check("dropout", x_, p, seed_);
  const at::Tensor x = x_.contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = x.new_empty(x.sizes());
  const int64_t n = x.numel();
  if (n == 0) return y;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double scale = dropout_scale(dropout_threshold(p));
  dispatch_float_types_and_double(x.scalar_type(), "dropout", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dropout_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(cptr<T>(x), mptr<T>(y), n, seed, dropout_threshold(p),
                                                              static_cast<acc_t<T>>(scale), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor dropout_backward_cuda(const at::Tensor& grad_, const at::Tensor& y_, double p, const at::Tensor& seed_,
                                 bool relu) {
  const uint64_t seed = check("dropout_backward", grad_, p, seed_);
  checks::dropout_output(grad_, y_);
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor y = relu ? y_.contiguous().to(grad.scalar_type()) : grad;
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = grad.new_empty(grad.sizes());
  const int64_t n = grad.numel();
  if (n == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double scale = dropout_scale(dropout_threshold(p));
  dispatch_float_types_and_double(grad.scalar_type(), "dropout_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dropout_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        cptr<T>(grad), cptr<T>(y), mptr<T>(out), n, seed, dropout_threshold(p), static_cast<acc_t<T>>(scale), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace xmcnas_fast::cuda
