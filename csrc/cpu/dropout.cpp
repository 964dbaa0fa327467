// Inverted dropout, optionally fused after a ReLU, on the CPU: one pass, no
// stored mask. y = keep_i ? f(x_i) / (1 - p) : 0 with f = ReLU or identity and
// keep_i from the counter-based stream of dropout_mask.h (one hash per four elements). The backward needs no
// mask either: after a ReLU, y_i > 0 exactly where the gradient flows (x_i > 0
// and kept); without it, keep_i is recomputed from the seed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../checks.h"
#include "dropout_mask.h"

namespace {

constexpr int64_t kGrain = 1 << 15;

uint64_t check(const char* op, const at::Tensor& x, double p, const at::Tensor& seed) {
  xmcnas_fast::checks::dropout_inputs(op, x, p, seed);
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

at::Tensor dropout_cpu(const at::Tensor& x_, double p, const at::Tensor& seed, bool relu) {
  const uint64_t s = check("dropout", x_, p, seed);
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  const uint32_t thr = xmcnas_fast::dropout_threshold(p);
  const double scale = xmcnas_fast::dropout_scale(thr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;  // float, or double for float64
    const opmath_t sc = static_cast<opmath_t>(scale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    auto run = [&](auto relu_tag) {
      constexpr bool kRelu = decltype(relu_tag)::value;
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
        uint64_t bits = xmcnas_fast::dropout_bits(s, static_cast<uint64_t>(b) >> 2);
        for (int64_t i = b; i < e; ++i) {
          if ((i & 3) == 0) bits = xmcnas_fast::dropout_bits(s, static_cast<uint64_t>(i) >> 2);
          opmath_t v = static_cast<opmath_t>(xp[i]);
          if constexpr (kRelu) v *= static_cast<opmath_t>(!(v < 0));  // branch-free; NaN passes, as torch.relu
          // branch-free: a random keep/drop decision would mispredict half the time
          yp[i] = static_cast<scalar_t>(v * (static_cast<opmath_t>(xmcnas_fast::dropout_lane_kept(bits, i, thr)) * sc));
        }
      });
    };
    if (relu) run(std::true_type{}); else run(std::false_type{});
  });
  return y;
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad_, const at::Tensor& y_, double p, const at::Tensor& seed,
                                bool relu) {
  const uint64_t s = check("dropout_backward", grad_, p, seed);
  xmcnas_fast::checks::dropout_output(grad_, y_);
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor y = relu ? y_.contiguous().to(grad.scalar_type()) : y_;
  at::Tensor gx = at::empty_like(grad);
  const uint32_t thr = xmcnas_fast::dropout_threshold(p);
  const double scale = xmcnas_fast::dropout_scale(thr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dropout_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t sc = static_cast<opmath_t>(scale);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = relu ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (relu) {
        for (int64_t i = b; i < e; ++i)
          op[i] = static_cast<scalar_t>(static_cast<opmath_t>(gp[i]) *
                                        (static_cast<opmath_t>(static_cast<opmath_t>(yp[i]) > 0) * sc));
        return;
      }
      uint64_t bits = xmcnas_fast::dropout_bits(s, static_cast<uint64_t>(b) >> 2);
      for (int64_t i = b; i < e; ++i) {
        if ((i & 3) == 0) bits = xmcnas_fast::dropout_bits(s, static_cast<uint64_t>(i) >> 2);
        op[i] = static_cast<scalar_t>(static_cast<opmath_t>(gp[i]) *
                                      (static_cast<opmath_t>(xmcnas_fast::dropout_lane_kept(bits, i, thr)) * sc));
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}
