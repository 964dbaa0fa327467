// Weighted layer-sum on CUDA: out = sum_i w[i] xs[i], one pass over memory,
// no stacked copy. Up to 16 input pointers travel in a kernel-parameter
// struct; more inputs are summed in groups of 16 into the output.
//
// Sums are formed in float32 (float64 for float64 inputs). Backward, also one
// pass: grad_xs[i] = w[i] grad and grad_w[i] = sum(grad xs[i]), the latter
// reduced per block (in the accumulation type per thread, float64 across the
// block) into a [blocks, K] buffer summed in a fixed order afterwards:
// reproducible, no atomics.
//
// Loads and stores are 16 bytes wide when every pointer is 16-byte aligned
// (the tail of the tensor, and misaligned views, go element by element).
#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.cuh"
#include "ops.cuh"

namespace xmcnas_fast::cuda {
namespace {

constexpr int kMaxK = 16;
constexpr int kThreads = 256;

struct InPtrs {
  const void* p[kMaxK];
};
struct OutPtrs {
  void* p[kMaxK];
};

template <typename T>
struct Vec {  // 16 bytes of T
  static constexpr int n = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[n];
  };
  __device__ Vec() : raw{0u, 0u, 0u, 0u} {}
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const void* base, int64_t i) {
  Vec<T> r;
  r.raw = __ldg(reinterpret_cast<const uint4*>(base) + i);
  return r;
}

// out = sum_{i < K} w[i] xs[i] (+ out when accumulate).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_sum_kernel(InPtrs xs, int K, const acc_t<T>* __restrict__ w, T* __restrict__ out, int64_t n,
                     bool vectorized, bool accumulate) {
  using A = acc_t<T>;
  constexpr int V = Vec<T>::n;
  A wr[kMaxK];
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) wr[i] = i < K ? w[i] : A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vectorized ? n / V : 0;

  for (int64_t v = tid; v < nvec; v += stride) {
    A acc[V];
    if (accumulate) {  // out is written here: a plain load, not the read-only path
      Vec<T> o;
      o.raw = reinterpret_cast<const uint4*>(out)[v];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = to_acc(o.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0;
    }
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      if (i < K) {
        const Vec<T> x = load_vec<T>(xs.p[i], v);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += wr[i] * to_acc(x.v[j]);
      }
    }
    Vec<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(acc[j]);
    reinterpret_cast<uint4*>(out)[v] = o.raw;
  }
  for (int64_t e = nvec * V + tid; e < n; e += stride) {
    A acc = accumulate ? to_acc(out[e]) : A(0);
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {  // static indices: the pointers stay in registers
      if (i < K) acc += wr[i] * to_acc(static_cast<const T*>(xs.p[i])[e]);
    }
    out[e] = from_acc<T>(acc);
  }
}

// grad_xs[i] = w[i] grad; ws[block, i] = this block's share of sum(grad xs[i]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_sum_backward_kernel(const T* __restrict__ grad, InPtrs xs, OutPtrs gxs, int K,
                              const acc_t<T>* __restrict__ w, double* __restrict__ ws, int64_t n, bool vectorized) {
  using A = acc_t<T>;
  constexpr int V = Vec<T>::n;
  __shared__ double red[kThreads / 32][kMaxK];
  A wr[kMaxK], part[kMaxK];
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
    wr[i] = i < K ? w[i] : A(0);
    part[i] = 0;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vectorized ? n / V : 0;

  for (int64_t v = tid; v < nvec; v += stride) {
    const Vec<T> gv = load_vec<T>(grad, v);
    A g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = to_acc(gv.v[j]);
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      if (i < K) {
        const Vec<T> x = load_vec<T>(xs.p[i], v);
        Vec<T> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          part[i] += g[j] * to_acc(x.v[j]);
          o.v[j] = from_acc<T>(wr[i] * g[j]);
        }
        reinterpret_cast<uint4*>(gxs.p[i])[v] = o.raw;
      }
    }
  }
  for (int64_t e = nvec * V + tid; e < n; e += stride) {
    const A g = to_acc(grad[e]);
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      if (i < K) {
        part[i] += g * to_acc(static_cast<const T*>(xs.p[i])[e]);
        static_cast<T*>(gxs.p[i])[e] = from_acc<T>(wr[i] * g);
      }
    }
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
    if (i < K) {
      const double s = warp_sum(static_cast<double>(part[i]));
      if (lane == 0) red[warp][i] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
    for (int wi = 0; wi < kThreads / 32; ++wi) s += red[wi][threadIdx.x];
    ws[static_cast<int64_t>(blockIdx.x) * K + threadIdx.x] = s;
  }
}

struct Checked {
  std::vector<at::Tensor> xs;  // contiguous
  at::Tensor w;                // in the accumulation type (float32, or float64 for float64 inputs), contiguous
};

Checked check(const char* op, at::TensorList xs, const at::Tensor& w) {
  checks::layer_sum_inputs(op, xs, w);
  Checked c;
  c.xs.reserve(xs.size());
  for (const at::Tensor& x : xs) c.xs.push_back(x.contiguous());
  c.w = w.to(acc_scalar_type(xs[0].scalar_type())).contiguous();
  return c;
}

int64_t grid_for(int64_t work, int device) {
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, device);
  return std::clamp<int64_t>(ceil_div(work, kThreads), 1, 8 * sms);
}

}  // namespace

at::Tensor layer_sum_cuda(at::TensorList xs_, const at::Tensor& w_) {
  const char* op = "layer_sum";
  const Checked c = check(op, xs_, w_);
  const at::Tensor& x0 = c.xs[0];
  const c10::cuda::CUDAGuard guard(x0.device());
  at::Tensor out = x0.new_empty(x0.sizes());
  const int64_t n = x0.numel();
  const int K = static_cast<int>(c.xs.size());
  if (n == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types_and_double(x0.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool aligned = aligned16(out.const_data_ptr());
    for (const at::Tensor& x : c.xs) aligned = aligned && aligned16(x.const_data_ptr());
    const int64_t blocks = grid_for(aligned ? ceil_div(n, Vec<T>::n) : n, x0.get_device());
    for (int k0 = 0; k0 < K; k0 += kMaxK) {  // groups of 16 inputs
      InPtrs p{};
      const int kg = std::min(kMaxK, K - k0);
      for (int i = 0; i < kg; ++i) p.p[i] = c.xs[k0 + i].const_data_ptr();
      layer_sum_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          p, kg, cptr<acc_t<T>>(c.w) + k0, mptr<T>(out), n, aligned, k0 > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> layer_sum_backward_cuda(const at::Tensor& grad_, at::TensorList xs_,
                                                                        const at::Tensor& w_) {
  const char* op = "layer_sum_backward";
  const Checked c = check(op, xs_, w_);
  const at::Tensor& x0 = c.xs[0];
  checks::layer_sum_grad(grad_, x0);
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Tensor grad = grad_.contiguous();
  const int64_t n = x0.numel();
  const int K = static_cast<int>(c.xs.size());
  std::vector<at::Tensor> gxs;
  gxs.reserve(K);
  for (int i = 0; i < K; ++i) gxs.push_back(x0.new_empty(x0.sizes()));
  if (n == 0) return {gxs, w_.new_zeros(w_.sizes())};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_w;
  dispatch_float_types_and_double(x0.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool aligned = aligned16(grad.const_data_ptr());
    for (int i = 0; i < K; ++i) {
      aligned = aligned && aligned16(c.xs[i].const_data_ptr()) && aligned16(gxs[i].const_data_ptr());
    }
    const int64_t blocks = grid_for(aligned ? ceil_div(n, Vec<T>::n) : n, x0.get_device());
    at::Tensor ws = grad.new_empty({blocks, K}, grad.options().dtype(at::kDouble));
    for (int k0 = 0; k0 < K; k0 += kMaxK) {
      InPtrs p{};
      OutPtrs q{};
      const int kg = std::min(kMaxK, K - k0);
      for (int i = 0; i < kg; ++i) {
        p.p[i] = c.xs[k0 + i].const_data_ptr();
        q.p[i] = gxs[k0 + i].mutable_data_ptr();
      }
      // ws columns k0 .. k0 + kg: the kernel writes [block, i] with row stride kg,
      // so give each group its own contiguous buffer.
      at::Tensor wsg = kg == K ? ws : grad.new_empty({blocks, kg}, grad.options().dtype(at::kDouble));
      layer_sum_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          cptr<T>(grad), p, q, kg, cptr<acc_t<T>>(c.w) + k0, wsg.mutable_data_ptr<double>(), n, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (kg != K) ws.narrow(1, k0, kg).copy_(wsg);
    }
    grad_w = ws.sum(0).to(w_.scalar_type());
  });
  return {gxs, grad_w};
}

}  // namespace xmcnas_fast::cuda
