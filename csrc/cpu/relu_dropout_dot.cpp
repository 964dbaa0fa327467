// The attention head's tail on the CPU: out[r] = sum_h w[h] * keep_i * relu(x_i) / (1 - p)
// over the H elements i = r * H + h of row r, keep_i from dropout's counter-based
// stream (dropout_mask.h) at x's own element indices, so that it equals
// dropout(x, p, seed, relu=True) @ w. With thousands of labels x is [B, L, H]
// (40 x 4,190 x 64 in the demo on such data): the unfused tail wrote
// dropout(relu(x)) and read it back three times, plus a [B, L, H] gradient;
// this reads x once forward and once backward and writes grad_x once.
//
// Both passes work a chunk of kRowChunk rows at a time: first the dropout bits
// of the whole chunk into a per-thread buffer (one splitmix64 hash per four
// elements; 8 hashes a vector on AVX-512), whose 64-bit words read as 16-bit
// numbers are the elements' lanes in order; then the rows, vectorized over h
// (AVX-512 for float32, plain loops otherwise). Out of training (p = 0) no
// bits are made: a plain fused ReLU-dot. The backward sums grad_w over rows
// in fixed chunks of kRowChunk rows, then the chunks in order: the same bits
// whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "avx512.h"
#include "dropout_mask.h"
#include "dropout_bits.h"
#include "output_buffers.h"

namespace {

using xmcnas_fast::cpu::chunk_bits_portable;
#if XMCNAS_HAS_AVX512_CODE
using xmcnas_fast::cpu::chunk_bits_avx512;
#endif

constexpr int64_t kRowChunk = 256;

struct Tail {
  at::Tensor x, w;  // contiguous; w in x's dtype or float32
  int64_t rows, H;
  uint64_t seed;
  uint32_t thr;
  double scale;
};

Tail prepare(const char* op, const at::Tensor& x, const at::Tensor& w, double p, const at::Tensor& seed) {
  xmcnas_fast::checks::relu_dropout_dot_inputs(op, x, w, p, seed);
  Tail t;
  t.x = x.contiguous();
  t.w = w.contiguous();
  t.H = x.size(-1);
  t.rows = t.H == 0 ? 0 : x.numel() / t.H;
  t.seed = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  t.thr = xmcnas_fast::dropout_threshold(p);
  t.scale = xmcnas_fast::dropout_scale(t.thr);
  return t;
}

// The rows [r0, r1) of a chunk and, in training, the dropout bits of its elements: those of
// element i are lane i % 4 of words[i / 4 - g0].
struct Chunk {
  int64_t r0, r1;
  const uint64_t* words = nullptr;  // null: nothing is dropped
  int64_t g0 = 0;
};

// keep_i * relu(x_i) * scale, and the gate keep_i * (x_i > 0) * scale, for element i of a chunk.
template <typename opmath_t>
inline opmath_t gate(const Chunk& c, uint32_t thr, int64_t i, opmath_t v, opmath_t sc) {
  const bool kept = c.words == nullptr ||
                    xmcnas_fast::dropout_lane_kept(c.words[(i >> 2) - c.g0], static_cast<uint64_t>(i), thr);
  return static_cast<opmath_t>(v > 0 && kept) * sc;
}

// Rows of a chunk, portable: out[r] = sum_h w[h] gate x.
template <typename scalar_t, typename wscalar_t>
void forward_rows_portable(const Tail& t, const Chunk& c, const scalar_t* xp, const wscalar_t* wp, scalar_t* op) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sc = static_cast<opmath_t>(t.scale);
  for (int64_t r = c.r0; r < c.r1; ++r) {
    opmath_t acc = 0;
    for (int64_t h = 0; h < t.H; ++h) {
      const int64_t i = r * t.H + h;
      const opmath_t v = static_cast<opmath_t>(xp[i]);
      acc += static_cast<opmath_t>(wp[h]) * v * gate(c, t.thr, i, v, sc);
    }
    op[r] = static_cast<scalar_t>(acc);
  }
}

// Rows of a chunk, portable: gx = g w gate, acc[h] += g x gate.
template <typename scalar_t, typename wscalar_t>
void backward_rows_portable(const Tail& t, const Chunk& c, const scalar_t* xp, const scalar_t* gp,
                            const wscalar_t* wp, scalar_t* gxp, at::opmath_type<scalar_t>* acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sc = static_cast<opmath_t>(t.scale);
  for (int64_t r = c.r0; r < c.r1; ++r) {
    const opmath_t g = static_cast<opmath_t>(gp[r]);
    for (int64_t h = 0; h < t.H; ++h) {
      const int64_t i = r * t.H + h;
      const opmath_t v = static_cast<opmath_t>(xp[i]);
      const opmath_t k = gate(c, t.thr, i, v, sc);
      acc[h] += g * (v * k);
      gxp[i] = static_cast<scalar_t>(g * static_cast<opmath_t>(wp[h]) * k);
    }
  }
}

#if XMCNAS_HAS_AVX512_CODE
// The gate of 16 elements from i on (m: the ones that exist): sc where x > 0 and kept, else 0.
XMCNAS_AVX512_INLINE __m512 gate16(const Chunk& c, uint32_t thr, int64_t i, __m512 x, __m512 sc, __mmask16 m) {
  __mmask16 k = _mm512_mask_cmp_ps_mask(m, x, _mm512_setzero_ps(), _CMP_GT_OQ);
  if (c.words != nullptr) {  // x86 is little-endian: the words read as 16-bit numbers are the lanes, in order
    const uint16_t* lane = reinterpret_cast<const uint16_t*>(c.words) + (i - 4 * c.g0);
    const __m512i lanes = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lane));
    k = _mm512_mask_cmpge_epu32_mask(k, lanes, _mm512_set1_epi32(static_cast<int>(thr)));
  }
  return _mm512_maskz_mov_ps(k, sc);
}

XMCNAS_AVX512 void forward_rows_avx512(const Tail& t, const Chunk& c, const float* xp, const float* wp, float* op) {
  const __m512 sc = _mm512_set1_ps(static_cast<float>(t.scale));
  for (int64_t r = c.r0; r < c.r1; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t h = 0; h < t.H; h += 16) {
      const __mmask16 m = xmcnas_fast::cpu::first_lanes(t.H - h);
      const int64_t i = r * t.H + h;
      const __m512 x = _mm512_maskz_loadu_ps(m, xp + i);
      const __m512 k = gate16(c, t.thr, i, x, sc, m);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wp + h), _mm512_mul_ps(x, k), acc);
    }
    op[r] = _mm512_reduce_add_ps(acc);
  }
}

XMCNAS_AVX512 void backward_rows_avx512(const Tail& t, const Chunk& c, const float* xp, const float* gp,
                                        const float* wp, float* gxp, float* acc) {
  const __m512 sc = _mm512_set1_ps(static_cast<float>(t.scale));
  for (int64_t r = c.r0; r < c.r1; ++r) {
    const __m512 g = _mm512_set1_ps(gp[r]);
    for (int64_t h = 0; h < t.H; h += 16) {
      const __mmask16 m = xmcnas_fast::cpu::first_lanes(t.H - h);
      const int64_t i = r * t.H + h;
      const __m512 x = _mm512_maskz_loadu_ps(m, xp + i);
      const __m512 k = gate16(c, t.thr, i, x, sc, m);
      _mm512_mask_storeu_ps(acc + h, m, _mm512_fmadd_ps(g, _mm512_mul_ps(x, k), _mm512_maskz_loadu_ps(m, acc + h)));
      _mm512_mask_storeu_ps(gxp + i, m, _mm512_mul_ps(_mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, wp + h)), k));
    }
  }
}
#endif

// Whether the float32 rows run on AVX-512.
template <typename scalar_t, typename wscalar_t>
bool fast_rows() {
  return std::is_same_v<scalar_t, float> && std::is_same_v<wscalar_t, float> && xmcnas_fast::cpu::has_avx512();
}

// Calls f(chunk) for every chunk of kRowChunk rows, in parallel, with the chunk's dropout lanes.
template <typename F>
void for_chunks(const Tail& t, bool fast, F&& f) {
  const int64_t chunks = (t.rows + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<uint64_t> bits(t.thr == 0 ? 0 : static_cast<size_t>((kRowChunk * t.H + 7) / 4 + 2));
    for (int64_t ci = cb; ci < ce; ++ci) {
      Chunk c{ci * kRowChunk, std::min(t.rows, (ci + 1) * kRowChunk)};
      if (t.thr != 0) {
        const uint64_t g0 = static_cast<uint64_t>(c.r0 * t.H) >> 2;
        const int64_t count = static_cast<int64_t>(((static_cast<uint64_t>(c.r1 * t.H) + 3) >> 2) - g0);
#if XMCNAS_HAS_AVX512_CODE
        if (fast)
          chunk_bits_avx512(t.seed, g0, count, bits.data());
        else
#endif
          chunk_bits_portable(t.seed, g0, count, bits.data());
        c.words = bits.data();
        c.g0 = static_cast<int64_t>(g0);
      }
      f(c);
    }
  });
}

template <typename scalar_t, typename wscalar_t>
void forward(const Tail& t, at::Tensor& out) {
  const scalar_t* xp = t.x.const_data_ptr<scalar_t>();
  const wscalar_t* wp = t.w.const_data_ptr<wscalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool fast = fast_rows<scalar_t, wscalar_t>();
  for_chunks(t, fast, [&](const Chunk& c) {
#if XMCNAS_HAS_AVX512_CODE
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<wscalar_t, float>) {
      if (fast) return forward_rows_avx512(t, c, xp, wp, op);
    }
#endif
    forward_rows_portable(t, c, xp, wp, op);
  });
}

template <typename scalar_t, typename wscalar_t>
void backward(const Tail& t, const at::Tensor& grad, at::Tensor& gx, at::Tensor& gw) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = t.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const wscalar_t* wp = t.w.const_data_ptr<wscalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const int64_t chunks = (t.rows + kRowChunk - 1) / kRowChunk;
  std::vector<opmath_t> partial(static_cast<size_t>(chunks * t.H), opmath_t(0));
  const bool fast = fast_rows<scalar_t, wscalar_t>();
  for_chunks(t, fast, [&](const Chunk& c) {
    opmath_t* acc = partial.data() + (c.r0 / kRowChunk) * t.H;
#if XMCNAS_HAS_AVX512_CODE
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<wscalar_t, float>) {
      if (fast) return backward_rows_avx512(t, c, xp, gp, wp, gxp, acc);
    }
#endif
    backward_rows_portable(t, c, xp, gp, wp, gxp, acc);
  });
  std::vector<opmath_t> sum(static_cast<size_t>(t.H), opmath_t(0));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t h = 0; h < t.H; ++h) sum[h] += partial[c * t.H + h];
  wscalar_t* gwp = gw.mutable_data_ptr<wscalar_t>();
  for (int64_t h = 0; h < t.H; ++h) gwp[h] = static_cast<wscalar_t>(sum[h]);
}

// Calls f.template operator()<scalar_t, wscalar_t>() for x's dtype and w's (float32 or x's).
template <typename F>
void dispatch(const Tail& t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.x.scalar_type(), "relu_dropout_dot_cpu", [&] {
    if (t.w.scalar_type() == t.x.scalar_type()) {
      f.template operator()<scalar_t, scalar_t>();
    } else {
      f.template operator()<scalar_t, float>();
    }
  });
}

at::Tensor relu_dropout_dot_cpu(const at::Tensor& x, const at::Tensor& w, double p, const at::Tensor& seed) {
  const Tail t = prepare("relu_dropout_dot", x, w, p, seed);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), t.x.options());
  dispatch(t, [&]<typename S, typename WS>() { forward<S, WS>(t, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> relu_dropout_dot_backward_cpu(const at::Tensor& grad_, const at::Tensor& x,
                                                                 const at::Tensor& w, double p,
                                                                 const at::Tensor& seed) {
  const Tail t = prepare("relu_dropout_dot_backward", x, w, p, seed);
  xmcnas_fast::checks::relu_dropout_dot_grad(grad_, x);
  const at::Tensor grad = grad_.contiguous().to(t.x.scalar_type());
  at::Tensor gx = xmcnas_fast::cpu::empty_output(t.x.sizes(), t.x.options());
  at::Tensor gw = at::empty_like(t.w);
  dispatch(t, [&]<typename S, typename WS>() { backward<S, WS>(t, grad, gx, gw); });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("relu_dropout_dot", &relu_dropout_dot_cpu);
  m.impl("relu_dropout_dot_backward", &relu_dropout_dot_backward_cpu);
}
