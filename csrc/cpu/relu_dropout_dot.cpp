// The attention head's tail on the CPU: out[r] = sum_h w[h] * keep_i * relu(x_i) / (1 - p)
// over the H elements i = r * H + h of row r, keep_i from dropout's counter-based
// stream (dropout_mask.h) at x's own element indices, so that it equals
// dropout(x, p, seed, relu=True) @ w. With thousands of labels x is [B, L, H]
// (40 x 4,190 x 64 in the demo on such data): the unfused tail wrote
// dropout(relu(x)) and read it back three times, plus a [B, L, H] gradient;
// this reads x once forward and once backward and writes grad_x once.
//
// The backward sums grad_w over rows in fixed chunks of kRowChunk rows, then
// the chunks in order: the same bits whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../checks.h"
#include "dropout_mask.h"

namespace {

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

// keep_i * relu(x_i) * scale for the H elements of row r, handed to f(h, value, kept-and-positive).
template <typename opmath_t, typename scalar_t, typename F>
inline void for_row(const Tail& t, const scalar_t* xp, int64_t r, opmath_t sc, F&& f) {
  const uint64_t i0 = static_cast<uint64_t>(r * t.H);
  // A row starting inside a group of 4 lanes takes that group's bits; any other, the loop's.
  uint64_t bits = (i0 & 3) ? xmcnas_fast::dropout_bits(t.seed, i0 >> 2) : 0;
  for (int64_t h = 0; h < t.H; ++h) {
    const uint64_t i = i0 + static_cast<uint64_t>(h);
    if ((i & 3) == 0) bits = xmcnas_fast::dropout_bits(t.seed, i >> 2);
    const opmath_t v = static_cast<opmath_t>(xp[i]);
    const opmath_t gate = static_cast<opmath_t>(v > 0 && xmcnas_fast::dropout_lane_kept(bits, i, t.thr)) * sc;
    f(h, v * gate, gate);
  }
}

template <typename scalar_t, typename wscalar_t>
void forward(const Tail& t, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = t.x.const_data_ptr<scalar_t>();
  const wscalar_t* wp = t.w.const_data_ptr<wscalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const opmath_t sc = static_cast<opmath_t>(t.scale);
  at::parallel_for(0, t.rows, kRowChunk, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      opmath_t acc = 0;
      for_row<opmath_t>(t, xp, r, sc, [&](int64_t h, opmath_t y, opmath_t) { acc += static_cast<opmath_t>(wp[h]) * y; });
      op[r] = static_cast<scalar_t>(acc);
    }
  });
}

template <typename scalar_t, typename wscalar_t>
void backward(const Tail& t, const at::Tensor& grad, at::Tensor& gx, at::Tensor& gw) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = t.x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const wscalar_t* wp = t.w.const_data_ptr<wscalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const opmath_t sc = static_cast<opmath_t>(t.scale);
  const int64_t chunks = (t.rows + kRowChunk - 1) / kRowChunk;
  std::vector<opmath_t> partial(static_cast<size_t>(chunks * t.H), opmath_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      opmath_t* acc = partial.data() + c * t.H;
      const int64_t end = std::min(t.rows, (c + 1) * kRowChunk);
      for (int64_t r = c * kRowChunk; r < end; ++r) {
        const opmath_t g = static_cast<opmath_t>(gp[r]);
        scalar_t* gxr = gxp + r * t.H;
        for_row<opmath_t>(t, xp, r, sc, [&](int64_t h, opmath_t y, opmath_t gate) {
          acc[h] += g * y;
          gxr[h] = static_cast<scalar_t>(g * static_cast<opmath_t>(wp[h]) * gate);
        });
      }
    }
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
  at::Tensor gx = at::empty_like(t.x);
  at::Tensor gw = at::empty_like(t.w);
  dispatch(t, [&]<typename S, typename WS>() { backward<S, WS>(t, grad, gx, gw); });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("relu_dropout_dot", &relu_dropout_dot_cpu);
  m.impl("relu_dropout_dot_backward", &relu_dropout_dot_backward_cpu);
}
