// Label-wise attention through the device's matrix products, a block of labels
// at a time (see label_attention_gemm.h). Per block of Lb labels, with the
// tokens of the whole batch as the rows of one matrix h2 [B*N, D]:
//
//   forward   S = h2 Wb^T [B*N, Lb]; lse = logsumexp over each row's real tokens
//             (+inf for a row without one); P = exp(S - lse), 0 on padding;
//             ctx = P^T v, one product per batch row;
//   backward  P again from the saved lse; dP = v dO^T; dS = P (dP - delta) with
//             delta = rowsum(dO * ctx); grad_W = dS^T h2 and grad_h += dS Wb (one
//             product each over the whole batch); grad_v (or grad_h) += P dO.
//
// Padding tokens are zeroed first and have P = 0, so they change nothing and
// get no gradient. S, lse, dP and dS are in the accumulation dtype (float32,
// float64 for float64); the products read the inputs' dtype.
#include "label_attention_gemm.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"

namespace xmcnas_fast::gemm {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool is_16bit(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16; }
at::ScalarType acc_type(at::ScalarType st) { return is_16bit(st) ? at::kFloat : st; }

// a @ b (one product per batch item when 3-D) with float32 (float64) accumulation, returned in `out`:
// the inputs' dtype or, for 16-bit inputs, float32, unrounded. cuBLAS returns 16-bit products in float32
// when asked (torch >= 2.8); the CPU multiplies float32 copies.
at::Tensor product(const at::Tensor& a, const at::Tensor& b, at::ScalarType out) {
  const bool batched = a.dim() == 3;
  if (out == a.scalar_type()) {
    if (a.is_cuda() || !is_16bit(out)) return batched ? at::bmm(a, b) : at::mm(a, b);
  } else if (a.is_cuda()) {
    return batched ? at::bmm(a, b, out) : at::mm(a, b, out);
  }
  const at::Tensor af = a.to(at::kFloat), bf = b.to(at::kFloat);
  return (batched ? at::bmm(af, bf) : at::mm(af, bf)).to(out);
}

// acc += a @ b, acc in the accumulation dtype.
void accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    a.dim() == 3 ? acc.baddbmm_(a, b) : acc.addmm_(a, b);
  } else {
    acc.add_(product(a, b, acc.scalar_type()));
  }
}

void check_dtype(const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble || is_16bit(h.scalar_type()),
                    "label_attention (matrix-product path): h must be float32, float64, bfloat16 or float16, got ",
                    checks::dtype_name(h.scalar_type()));
}

struct Blocked {
  at::Tensor h, h2, vals, W, mask, pad, empty;  // h2 = h as [B*N, D]; pad [B,N,1]; empty [B,1]
  int64_t B, N, D, Dv, L, Lb;
  at::ScalarType dtype, acc;
};

Blocked prepare(const at::Tensor& h_, const at::Tensor& mask, const at::Tensor& W_, const std::optional<at::Tensor>& v,
                int64_t block) {
  check_dtype(h_);
  Blocked x;
  x.mask = mask.contiguous();
  x.pad = mask.logical_not().unsqueeze(-1);
  // Zeros over the padding (one pass, small beside the products): whatever sits there, NaN
  // included, must not reach a product of a real token's row.
  x.h = h_.masked_fill(x.pad, 0).contiguous();
  x.W = W_.contiguous();
  x.vals = v ? v->masked_fill(x.pad, 0).contiguous() : x.h;
  x.B = x.h.size(0), x.N = x.h.size(1), x.D = x.h.size(2), x.L = x.W.size(0), x.Dv = x.vals.size(2);
  x.h2 = x.h.view({x.B * x.N, x.D});
  x.empty = mask.any(1).logical_not().unsqueeze(1);
  x.dtype = x.h.scalar_type();
  x.acc = acc_type(x.dtype);
  TORCH_CHECK_VALUE(block >= 0, "label_attention (matrix-product path): block must be >= 0, got ", block);
  x.Lb = block > 0 ? block : labels_per_block(x.B, x.N, x.L);
  return x;
}

// The scores of labels [l0, l0 + n) as [B, N, n], in the accumulation dtype.
at::Tensor block_scores(const Blocked& x, int64_t l0, int64_t n) {
  return product(x.h2, x.W.narrow(0, l0, n).t(), x.acc).view({x.B, x.N, n});
}

// P of one block's scores s (consumed), in the inputs' dtype; its log-sum-exp into lse_out [B, n].
at::Tensor block_softmax(const Blocked& x, at::Tensor s, const at::Tensor& lse_out) {
#ifdef XMCNAS_WITH_CUDA
  if (s.is_cuda()) return cuda::gemm_block_softmax(s, x.mask, x.dtype, lse_out);
#endif
  s.masked_fill_(x.pad, -kInf);
  const at::Tensor lb = at::logsumexp(s, {1}).masked_fill_(x.empty, kInf);  // [B, n]
  lse_out.copy_(lb);
  return s.sub_(lb.unsqueeze(1)).exp_().to(x.dtype);
}

// (P, dS) of one block from its scores s and dP (both consumed), in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor> block_softmax_backward(const Blocked& x, at::Tensor s, at::Tensor dp,
                                                          const at::Tensor& lse, const at::Tensor& delta) {
#ifdef XMCNAS_WITH_CUDA
  if (s.is_cuda()) return cuda::gemm_block_softmax_backward(s, dp, x.mask, lse, delta, x.dtype);
#endif
  at::Tensor p = s.masked_fill_(x.pad, -kInf).sub_(lse.to(x.acc).unsqueeze(1)).exp_();
  at::Tensor ds = dp.sub_(delta.unsqueeze(1)).mul_(p);
  return {p.to(x.dtype), ds.to(x.dtype)};
}

// The products inside run in the inputs' dtype, as chosen, whatever the caller's settings: off for
// autocast (under torch.autocast they would otherwise run in autocast's dtype), and IEEE float32 for
// float32 inputs whatever torch.backends.cuda.matmul allows. TF32 keeps 10 bits of mantissa, so a score
// near 5000 would move by about 2 (a factor e^2 in its weight); the same goes for dP in the backward,
// where dP - delta cancels. at::NoTF32Guard is thread-local: other threads keep their setting.
struct ExactProducts {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::NoTF32Guard no_tf32;
};

}  // namespace

int64_t labels_per_block(int64_t B, int64_t N, int64_t L) {
  int64_t lb = kGemmBlockElements / std::max<int64_t>(1, B * N);
  if (lb >= 64) lb -= lb % 64;  // whole tiles for the matrix-product library
  return std::clamp<int64_t>(lb, 1, std::max<int64_t>(1, L));
}

std::tuple<at::Tensor, at::Tensor> label_attention_gemm(const at::Tensor& h, const at::Tensor& mask,
                                                        const at::Tensor& W, const std::optional<at::Tensor>& v,
                                                        int64_t block) {
  const ExactProducts exact;
  const Blocked x = prepare(h, mask, W, v, block);
  at::Tensor ctx = at::empty({x.B, x.L, x.Dv}, x.h.options());
  at::Tensor lse = at::empty({x.B, x.L}, x.h.options().dtype(at::kFloat));
  if (x.B == 0 || x.L == 0) return {ctx, lse};
  if (x.N == 0) return {ctx.zero_(), lse.fill_(kInf)};
  for (int64_t l0 = 0; l0 < x.L; l0 += x.Lb) {
    const int64_t n = std::min(x.Lb, x.L - l0);
    const at::Tensor p = block_softmax(x, block_scores(x, l0, n), lse.narrow(1, l0, n));  // [B, N, n]
    ctx.narrow(1, l0, n).copy_(product(p.transpose(1, 2), x.vals, x.dtype));
  }
  return {ctx, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_gemm_backward(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse, int64_t block) {
  const ExactProducts exact;
  const Blocked x = prepare(h, mask, W, v, block);
  const auto acc_options = x.h.options().dtype(x.acc);
  at::Tensor grad_h = at::zeros({x.B, x.N, x.D}, acc_options);
  at::Tensor grad_v = v ? at::zeros({x.B, x.N, x.Dv}, acc_options) : x.h.new_empty({0});
  at::Tensor grad_W = at::zeros_like(x.W);
  if (x.B == 0 || x.L == 0 || x.N == 0) return {grad_h.to(x.dtype), grad_W, grad_v.to(x.dtype)};
  const at::Tensor dO = grad_ctx.contiguous();
  at::Tensor gh2 = grad_h.view({x.B * x.N, x.D});
  at::Tensor& gvals = v ? grad_v : grad_h;
  for (int64_t l0 = 0; l0 < x.L; l0 += x.Lb) {
    const int64_t n = std::min(x.Lb, x.L - l0);
    const at::Tensor dOb = dO.narrow(1, l0, n);                                              // [B, n, Dv]
    const at::Tensor delta = (dOb.to(x.acc) * ctx.narrow(1, l0, n).to(x.acc)).sum(-1);       // [B, n]
    const at::Tensor dp = product(x.vals, dOb.transpose(1, 2), x.acc);                       // [B, N, n]
    const auto [p, ds] = block_softmax_backward(x, block_scores(x, l0, n), dp, lse.narrow(1, l0, n), delta);
    const at::Tensor ds2 = ds.view({x.B * x.N, n});
    const at::Tensor Wb = x.W.narrow(0, l0, n);
    grad_W.narrow(0, l0, n).copy_(product(ds2.t(), x.h2, x.dtype));
    accumulate(gh2, ds2, Wb);
    accumulate(gvals, p, dOb);
  }
  return {grad_h.to(x.dtype), grad_W, v ? grad_v.to(x.dtype) : grad_v};
}

namespace {

std::tuple<at::Tensor, at::Tensor> checked_forward(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                                                   const std::optional<at::Tensor>& v, int64_t block) {
  checks::label_attention_inputs(h, mask, W, v);
  const c10::DeviceGuard guard(h.device());  // the softmax kernels launch on the current device
  return label_attention_gemm(h, mask, W, v, block);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_backward(const at::Tensor& grad_ctx, const at::Tensor& h,
                                                                const at::Tensor& mask, const at::Tensor& W,
                                                                const std::optional<at::Tensor>& v,
                                                                const at::Tensor& ctx, const at::Tensor& lse,
                                                                int64_t block) {
  checks::label_attention_inputs(h, mask, W, v);
  checks::label_attention_saved(h, W, v, grad_ctx, ctx, lse);
  const c10::DeviceGuard guard(h.device());
  return label_attention_gemm_backward(grad_ctx, h, mask, W, v, ctx, lse, block);
}

}  // namespace
}  // namespace xmcnas_fast::gemm

// The private operators that let the tests run this path on every device.
TORCH_LIBRARY_IMPL(xmcnas_fast, CompositeExplicitAutograd, m) {
  m.impl("_label_attention_gemm", &xmcnas_fast::gemm::checked_forward);
  m.impl("_label_attention_gemm_backward", &xmcnas_fast::gemm::checked_backward);
}
