// Label-wise attention through the device's matrix products, a block of labels
// at a time (see label_attention_gemm.h). Per block of Lb labels, with the
// tokens of the whole batch as the rows of one matrix h2 [B*N, D]:
//
//   forward   S = h2 Wb^T [B*N, Lb], -inf on padding; lse = logsumexp over each
//             row's tokens (+inf for a row without a real token); P = exp(S - lse);
//             ctx = P^T v, one product per batch row;
//   backward  P again from the saved lse; dP = v dO^T; dS = P (dP - delta) with
//             delta = rowsum(dO * ctx); grad_W = dS^T h2 and grad_h += dS Wb (one
//             product each over the whole batch); grad_v (or grad_h) += P dO.
//
// Padding tokens are zeroed first and have P = 0, so they change nothing and
// get no gradient. Everything stays in the
// inputs' dtype (float32 or float64); lse is float32 as the contract says.
#include "label_attention_gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"

namespace xmcnas_fast::gemm {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void check_dtype(const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
                    "label_attention (matrix-product path): h must be float32 or float64, got ",
                    checks::dtype_name(h.scalar_type()));
}

struct Blocked {
  at::Tensor h, h2, vals, W, pad, empty;  // h2 = h as [B*N, D]; pad [B,N,1]; empty [B,1]
  int64_t B, N, D, Dv, L, Lb;
};

Blocked prepare(const at::Tensor& h_, const at::Tensor& mask, const at::Tensor& W_, const std::optional<at::Tensor>& v,
                int64_t block) {
  check_dtype(h_);
  Blocked x;
  x.pad = mask.logical_not().unsqueeze(-1);
  // Zeros over the padding (one pass, small beside the products): whatever sits there, NaN
  // included, must not reach a product of a real token's row.
  x.h = h_.masked_fill(x.pad, 0).contiguous();
  x.W = W_.contiguous();
  x.vals = v ? v->masked_fill(x.pad, 0).contiguous() : x.h;
  x.B = x.h.size(0), x.N = x.h.size(1), x.D = x.h.size(2), x.L = x.W.size(0), x.Dv = x.vals.size(2);
  x.h2 = x.h.view({x.B * x.N, x.D});
  x.empty = mask.any(1).logical_not().unsqueeze(1);
  TORCH_CHECK_VALUE(block >= 0, "label_attention (matrix-product path): block must be >= 0, got ", block);
  x.Lb = block > 0 ? block : labels_per_block(x.B, x.N, x.L);
  return x;
}

// The scores of labels [l0, l0 + n) as [B, N, n], -inf on padding tokens.
at::Tensor block_scores(const Blocked& x, int64_t l0, int64_t n) {
  return at::mm(x.h2, x.W.narrow(0, l0, n).t()).view({x.B, x.N, n}).masked_fill_(x.pad, -kInf);
}

}  // namespace

int64_t labels_per_block(int64_t B, int64_t N, int64_t L) {
  int64_t lb = kGemmBlockElements / std::max<int64_t>(1, B * N);
  if (lb >= 64) lb -= lb % 64;  // whole tiles for the matrix-product library
  return std::clamp<int64_t>(lb, 1, std::max<int64_t>(1, L));
}

std::tuple<at::Tensor, at::Tensor> label_attention_gemm(const at::Tensor& h, const at::Tensor& mask,
                                                        const at::Tensor& W, const std::optional<at::Tensor>& v,
                                                        int64_t block) {
  const Blocked x = prepare(h, mask, W, v, block);
  at::Tensor ctx = at::empty({x.B, x.L, x.Dv}, x.h.options());
  at::Tensor lse = at::empty({x.B, x.L}, x.h.options().dtype(at::kFloat));
  if (x.B == 0 || x.L == 0) return {ctx, lse};
  if (x.N == 0) return {ctx.zero_(), lse.fill_(kInf)};
  for (int64_t l0 = 0; l0 < x.L; l0 += x.Lb) {
    const int64_t n = std::min(x.Lb, x.L - l0);
    at::Tensor s = block_scores(x, l0, n);
    at::Tensor lb = at::logsumexp(s, {1}).masked_fill_(x.empty, kInf);  // [B, n]
    s.sub_(lb.unsqueeze(1)).exp_();                                      // the probabilities
    ctx.narrow(1, l0, n).copy_(at::bmm(s.transpose(1, 2), x.vals));
    lse.narrow(1, l0, n).copy_(lb);
  }
  return {ctx, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_gemm_backward(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse, int64_t block) {
  const Blocked x = prepare(h, mask, W, v, block);
  at::Tensor grad_h = at::zeros_like(x.h);
  at::Tensor grad_v = v ? at::zeros_like(x.vals) : x.h.new_empty({0});
  at::Tensor grad_W = at::zeros_like(x.W);
  if (x.B == 0 || x.L == 0 || x.N == 0) return {grad_h, grad_W, grad_v};
  const at::Tensor dO = grad_ctx.contiguous();
  const at::Tensor delta = (dO * ctx).sum(-1);       // [B, L]
  const at::Tensor lse_h = lse.to(x.h.scalar_type());
  at::Tensor gh2 = grad_h.view({x.B * x.N, x.D});
  at::Tensor& gvals = v ? grad_v : grad_h;
  for (int64_t l0 = 0; l0 < x.L; l0 += x.Lb) {
    const int64_t n = std::min(x.Lb, x.L - l0);
    at::Tensor p = block_scores(x, l0, n).sub_(lse_h.narrow(1, l0, n).unsqueeze(1)).exp_();  // [B, N, n]
    const at::Tensor dOb = dO.narrow(1, l0, n);                                              // [B, n, Dv]
    at::Tensor ds = at::bmm(x.vals, dOb.transpose(1, 2));                                   // dP [B, N, n]
    ds.sub_(delta.narrow(1, l0, n).unsqueeze(1)).mul_(p);
    const at::Tensor ds2 = ds.view({x.B * x.N, n});
    grad_W.narrow(0, l0, n).copy_(at::mm(ds2.t(), x.h2));
    gh2.addmm_(ds2, x.W.narrow(0, l0, n));
    gvals.baddbmm_(p, dOb);
  }
  return {grad_h, grad_W, grad_v};
}

namespace {

std::tuple<at::Tensor, at::Tensor> checked_forward(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                                                   const std::optional<at::Tensor>& v, int64_t block) {
  checks::label_attention_inputs(h, mask, W, v);
  return label_attention_gemm(h, mask, W, v, block);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_backward(const at::Tensor& grad_ctx, const at::Tensor& h,
                                                                const at::Tensor& mask, const at::Tensor& W,
                                                                const std::optional<at::Tensor>& v,
                                                                const at::Tensor& ctx, const at::Tensor& lse,
                                                                int64_t block) {
  checks::label_attention_inputs(h, mask, W, v);
  checks::label_attention_saved(h, W, v, grad_ctx, ctx, lse);
  return label_attention_gemm_backward(grad_ctx, h, mask, W, v, ctx, lse, block);
}

}  // namespace
}  // namespace xmcnas_fast::gemm

// The private operators that let the tests run this path on every device.
TORCH_LIBRARY_IMPL(xmcnas_fast, CompositeExplicitAutograd, m) {
  m.impl("_label_attention_gemm", &xmcnas_fast::gemm::checked_forward);
  m.impl("_label_attention_gemm_backward", &xmcnas_fast::gemm::checked_backward);
}
