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

// Calls fn(TypeTag<T>{}) with T = __half or __nv_bfloat16 and returns true for
// the 16-bit dtypes; false for any other.
template <typename Fn>
bool dispatch_16bit_types(at::ScalarType st, Fn&& fn) {
  if (st == at::kHalf) {
    fn(TypeTag<__half>{});
  } else if (st == at::kBFloat16) {
    fn(TypeTag<__nv_bfloat16>{});
  } else {
    return false;
  }
  return true;
}

// Calls fn(TypeTag<T>{}) with T = float, __half or __nv_bfloat16; anything else
// is a ValueError naming `op`.
template <typename Fn>
void dispatch_float_types(at::ScalarType st, const char* op, Fn&& fn) {
  if (st == at::kFloat) {
    fn(TypeTag<float>{});
  } else if (!dispatch_16bit_types(st, fn)) {
    TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st, " on CUDA (float32, float16 or bfloat16)");
  }
}

// As dispatch_float_types, with T = double as well (the kernels that gradcheck
// runs on: they accumulate in acc_t<T>).
template <typename Fn>
void dispatch_float_types_and_double(at::ScalarType st, const char* op, Fn&& fn) {
  if (st == at::kDouble) {
    fn(TypeTag<double>{});
  } else {
    dispatch_float_types(st, op, static_cast<Fn&&>(fn));
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

// The accumulation type of element type T (float, or double for double), and
// the conversions and math in it.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return from_float<T>(x);
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

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
