// Helpers shared by the CUDA kernels of xmcnas_fast: dtype dispatch onto the
// CUDA native types, float conversions, warp reductions, device attributes.
//
// Only light headers: this file is compiled by nvcc once per .cu file and in
// every CI run, so torch/extension.h (and ATen/ATen.h) stay out.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace xmcnas_fast::cuda {

// ---------------------------------------------------------------------------
// dtype dispatch: at::ScalarType -> the CUDA native element type.
// ---------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T = float, __half or __nv_bfloat16; anything else
// is a ValueError naming `op`.
template <typename Fn>
void dispatch_float_types(at::ScalarType st, const char* op, Fn&& fn) {
  switch (st) {
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kHalf:
      fn(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st, " on CUDA (float32, float16 or bfloat16)");
  }
}

inline bool is_supported_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

template <typename T>
inline const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
inline T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------
// Conversions (the build defines __CUDA_NO_HALF_CONVERSIONS__: be explicit).
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------
// Warp reductions (full warp participates).
// ---------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ---------------------------------------------------------------------------
// Device attributes and launch helpers.
// ---------------------------------------------------------------------------

inline int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The op's tensors must all be on the CUDA device of `ref` (CPU tensors are
// not moved silently: the caller decides where its data lives).
inline void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the op runs on ",
                    ref.device());
}

}  // namespace xmcnas_fast::cuda
