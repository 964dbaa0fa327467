// Weighted layer-sum on the CPU: out = sum_i w[i] * xs[i], and its backward,
// each in one pass over memory with no stacked copy of the inputs.
//
// Elements go in blocks of kBlock. Forward reads each input block once and
// sums it into an L1 block in the op-math type (float for float32 / bfloat16
// / float16, double for float64), in groups of up to kGroup inputs with the
// group size known at compile time; reduced-precision inputs are widened into
// L1 scratch. Backward writes grad_xs[i] = w[i] * grad and reduces
// grad_w[i] = sum(grad * xs[i]) in the same pass over grad; the products are
// formed and summed in double, per chunk of elements, and the chunks' sums
// are added in a fixed order, so grad_w does not depend on the number of
// threads. Finished blocks go to large outputs with non-temporal stores, and
// large outputs are backed by huge pages where the OS allows: on the
// machines measured, first touching new memory and reading lines before
// writing them cost more than the arithmetic.
//
// The loops are plain `omp simd` loops rather than at::vec::Vectorized: in an
// extension build Vectorized is its generic fallback (arrays of lanes with a
// loop per operation), and the compiler turned some instantiations of it into
// scalar code; the loop vectorizer handles these loops reliably.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"

namespace {

constexpr int64_t kBlock = 1024;  // elements per inner block (scratch stays in L1)
constexpr int kGroup = 4;         // inputs summed per pass over a block
// Outputs bigger than this in all go out with non-temporal stores: past the
// last-level cache, the reader would not find them there anyway.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether an input of type scalar_t is used in place (no widening copy).
template <typename scalar_t>
constexpr bool kDirect = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

// Checks the inputs shared by forward and backward; returns xs made contiguous.
std::vector<at::Tensor> check_inputs(const char* op, at::TensorList xs, const at::Tensor& w) {
  xmcnas_fast::checks::layer_sum_inputs(op, xs, w);
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const at::Tensor& x : xs) out.push_back(x.contiguous());
  return out;
}

template <typename opmath_t>
std::vector<opmath_t> weights(const at::Tensor& w) {
  const at::Tensor wd = w.to(at::kDouble).contiguous();
  const double* p = wd.const_data_ptr<double>();
  return std::vector<opmath_t>(p, p + wd.numel());
}

template <typename scalar_t>
std::vector<const scalar_t*> data_ptrs(const std::vector<at::Tensor>& xs) {
  std::vector<const scalar_t*> ptrs;
  for (const auto& x : xs) ptrs.push_back(x.const_data_ptr<scalar_t>());
  return ptrs;
}

// Calls f(std::integral_constant<int, min(g, G)>()).
template <int G, typename F>
inline void with_group_size(int64_t g, const F& f) {
  if constexpr (G > 1) {
    if (g < G) return with_group_size<G - 1>(g, f);
  }
  f(std::integral_constant<int, G>());
}

// out[j] = (kFirst ? 0 : out[j]) + sum_c w[c] * x[c][j] for j < len, over G
// inputs. Pointers and weights are copied to locals (out might alias the
// arrays that hold them, which would force reloads); out never overlaps an x.
template <int G, bool kFirst, typename T>
inline void weighted_sum(const T* const* x_in, const T* w_in, T* out, int64_t len) {
  const T* x[G];
  T w[G];
  for (int c = 0; c < G; ++c) {
    x[c] = x_in[c];
    w[c] = w_in[c];
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    T acc = kFirst ? x[0][j] * w[0] : out[j] + x[0][j] * w[0];
    for (int c = 1; c < G; ++c) acc += x[c][j] * w[c];
    out[j] = acc;
  }
}

// gx[j] = w * g[j] for j < len; returns sum_j g[j] * x[j], formed in double.
template <typename T>
inline double scale_and_dot(const T* g, const T* x, T w, T* gx, int64_t len) {
  double dot = 0.0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < len; ++j) {
    gx[j] = g[j] * w;
    dot += static_cast<double>(g[j]) * static_cast<double>(x[j]);
  }
  return dot;
}

// The current block of an input in opmath_t: the input itself, or its block
// widened into scratch.
template <typename scalar_t>
inline const at::opmath_type<scalar_t>* widen(const scalar_t* x, int64_t len, at::opmath_type<scalar_t>* scratch) {
  if constexpr (kDirect<scalar_t>) {
    return x;
  } else {
    at::vec::convert(x, scratch, len);
    return scratch;
  }
}

// Writes a block computed in L1 scratch to its place in the output. With
// stream set, float / double go out with non-temporal stores where the
// destination is aligned: a plain store first reads the destination line
// (one more stream of memory traffic) and evicts inputs from the cache.
// Reduced precision types are narrowed on the way.
template <typename scalar_t>
inline void write_out(const at::opmath_type<scalar_t>* src, scalar_t* dst, int64_t len, bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    constexpr int64_t W = 16 / sizeof(scalar_t);
    if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
      int64_t j = 0;
      for (; j + W <= len; j += W) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          _mm_stream_ps(dst + j, _mm_load_ps(src + j));
        } else {
          _mm_stream_pd(dst + j, _mm_load_pd(src + j));
        }
      }
      std::copy(src + j, src + len, dst + j);
      return;
    }
  }
#endif
  at::vec::convert(src, dst, len);
}

// Orders the non-temporal stores of this thread before what follows.
inline void fence_streams() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename scalar_t>
void forward_kernel(const std::vector<const scalar_t*>& xs, const std::vector<at::opmath_type<scalar_t>>& w,
                    scalar_t* out, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size());
  const bool stream = n * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
  at::parallel_for(0, n, 32 * kBlock, [&](int64_t begin, int64_t end) {
    // Block 0: the sum; blocks 1..K: widened inputs (reduced precision only).
    std::vector<opmath_t> scratch((kDirect<scalar_t> ? 1 : K + 1) * kBlock);
    opmath_t* acc = scratch.data();
    std::vector<const opmath_t*> x(K);
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t len = std::min(kBlock, end - b);
      for (int64_t i = 0; i < K; ++i) x[i] = widen(xs[i] + b, len, scratch.data() + (i + 1) * kBlock);
      for (int64_t g = 0; g < K; g += kGroup) {
        with_group_size<kGroup>(K - g, [&](auto G) {
          if (g == 0) {
            weighted_sum<G.value, true>(x.data(), w.data(), acc, len);
          } else {
            weighted_sum<G.value, false>(x.data() + g, w.data() + g, acc, len);
          }
        });
      }
      write_out(acc, out + b, len, stream);
    }
    fence_streams();
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const std::vector<const scalar_t*>& xs,
                     const std::vector<at::opmath_type<scalar_t>>& w, const std::vector<scalar_t*>& grad_xs,
                     int64_t n, std::vector<double>& partial /* [n_chunks, K] */, int64_t chunk) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const bool stream = K * n * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    // Blocks: the input gradient being formed, then widened grad and input.
    std::vector<opmath_t> scratch((kDirect<scalar_t> ? 1 : 3) * kBlock);
    opmath_t* gx = scratch.data();
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t c_stop = std::min(n, (c + 1) * chunk);
      double* dot = partial.data() + c * K;
      for (int64_t b = c * chunk; b < c_stop; b += kBlock) {
        const int64_t len = std::min(kBlock, c_stop - b);
        const opmath_t* g = widen(grad + b, len, scratch.data() + kBlock);
        for (int64_t i = 0; i < K; ++i) {
          const opmath_t* x = widen(xs[i] + b, len, scratch.data() + 2 * kBlock);
          dot[i] += scale_and_dot(g, x, w[i], gx, len);
          write_out(gx, grad_xs[i] + b, len, stream);
        }
      }
    }
    fence_streams();
  });
}

// Asks the kernel to back a large new output with huge pages (Linux): its
// first touch then costs one page fault per 2 MB instead of per 4 KB, which
// on some machines (virtual machines especially) takes longer than computing
// the output. Only the aligned 2 MB pages inside the tensor's memory.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (first + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

at::Tensor layer_sum_cpu(at::TensorList xs_in, const at::Tensor& w) {
  const std::vector<at::Tensor> xs = check_inputs("layer_sum", xs_in, w);
  at::Tensor out = at::empty_like(xs[0], at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "layer_sum", [&] {
    forward_kernel<scalar_t>(data_ptrs<scalar_t>(xs), weights<at::opmath_type<scalar_t>>(w),
                             out.mutable_data_ptr<scalar_t>(), n);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> layer_sum_backward_cpu(const at::Tensor& grad_in,
                                                                       at::TensorList xs_in,
                                                                       const at::Tensor& w) {
  const std::vector<at::Tensor> xs = check_inputs("layer_sum_backward", xs_in, w);
  xmcnas_fast::checks::layer_sum_grad(grad_in, xs[0]);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t n = grad.numel();
  std::vector<at::Tensor> grad_xs;
  for (int64_t i = 0; i < K; ++i) {
    grad_xs.push_back(at::empty_like(xs[i], at::MemoryFormat::Contiguous));
    advise_huge_pages(grad_xs.back());
  }
  constexpr int64_t chunk = 64 * kBlock;
  std::vector<double> partial(((n + chunk - 1) / chunk) * K, 0.0);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "layer_sum_backward", [&] {
      std::vector<scalar_t*> gptrs;
      for (auto& g : grad_xs) gptrs.push_back(g.mutable_data_ptr<scalar_t>());
      backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), data_ptrs<scalar_t>(xs),
                                weights<at::opmath_type<scalar_t>>(w), gptrs, n, partial, chunk);
    });
  }
  at::Tensor total = at::zeros({K}, w.options().dtype(at::kDouble));
  double* t_ptr = total.mutable_data_ptr<double>();
  for (size_t t = 0; t < partial.size(); ++t) t_ptr[t % K] += partial[t];
  return {grad_xs, total.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("layer_sum", &layer_sum_cpu);
  m.impl("layer_sum_backward", &layer_sum_backward_cpu);
}
