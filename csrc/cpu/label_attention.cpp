// Label-wise attention on the CPU, forward and backward, without the [B,L,N]
// score tensor.
//
// The work is cut into tasks (b, label block): a block of kLabelBlock labels
// attends over the real tokens of batch row b. A task computes its scores one
// token tile at a time into a small per-thread scratch, with an online softmax
// across tiles (one tile when N <= kTokenTile, the usual case), and the
// backward recomputes them from the saved log-sum-exp. Padding tokens are
// dropped before any arithmetic: the real tokens of a row are gathered into a
// compact [Nr, D] block (or viewed in place when they form one run and need no
// conversion), so padding anywhere in a row costs nothing.
//
// The products are tiles of GEMMs (a few hundred on each side), done by ATen's
// BLAS on views of the tiles. Inside at::parallel_for the BLAS runs on the
// calling thread (nested regions are serial), so threads are not
// oversubscribed. bf16/fp16 tiles are widened to float32 before the GEMM:
// accumulation is float32 (float64 for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLabelBlock = 128;  // labels per task
constexpr int64_t kTokenTile = 512;   // real tokens per score tile

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The real tokens of each batch row: their positions, concatenated.
struct RealTokens {
  std::vector<int64_t> offset;  // B+1
  std::vector<int64_t> pos;
  std::vector<bool> one_run;  // row b's real tokens are consecutive positions

  explicit RealTokens(const at::Tensor& mask) {
    const int64_t B = mask.size(0), N = mask.size(1);
    const bool* m = mask.data_ptr<bool>();
    offset.assign(1, 0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n)
        if (m[b * N + n]) pos.push_back(n);
      offset.push_back(static_cast<int64_t>(pos.size()));
      const int64_t c = count(b);
      one_run.push_back(c == 0 || pos[offset[b] + c - 1] - pos[offset[b]] == c - 1);
    }
  }
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
  const int64_t* positions(int64_t b) const { return pos.data() + offset[b]; }
};

// Task boundaries (parts+1 entries) splitting the tasks into `parts`
// consecutive ranges of about equal cost.
std::vector<int64_t> balanced_split(const std::vector<double>& cost, int64_t parts) {
  const int64_t n = static_cast<int64_t>(cost.size());
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds{0};
  double acc = 0;
  int64_t i = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    while (i < n && acc + cost[i] / 2 < target) acc += cost[i++];
    bounds.push_back(i);
  }
  bounds.push_back(n);
  return bounds;
}

// Tasks are (b, label block) in b-major order; the cost of one is its real
// tokens times its labels, plus a little for the fixed work on padding rows.
std::vector<double> task_costs(const RealTokens& rt, int64_t B, int64_t L) {
  const int64_t nlb = (L + kLabelBlock - 1) / kLabelBlock;
  std::vector<double> cost;
  cost.reserve(B * nlb);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nlb; ++j)
      cost.push_back(static_cast<double>(rt.count(b) + 8) *
                     static_cast<double>(std::min(kLabelBlock, L - j * kLabelBlock)));
  return cost;
}


// What forward and backward share: the shapes, the real tokens, W in the
// accumulation type, and the split of the (b, label block) tasks over threads.
struct Plan {
  int64_t B, N, D, L, nlb;
  RealTokens rt;
  at::Tensor Wa;
  std::vector<int64_t> bounds;  // thread range p covers tasks [bounds[p], bounds[p+1])
  int64_t parts;

  Plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, at::ScalarType acc_dtype)
      : B(h.size(0)), N(h.size(1)), D(h.size(2)), L(W.size(0)),
        nlb((L + kLabelBlock - 1) / kLabelBlock), rt(mask), Wa(W.to(acc_dtype)) {  // W.to: no-op for f32/f64
    const int64_t tasks = B * nlb;
    bounds = balanced_split(task_costs(rt, B, L),
                            std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
    parts = static_cast<int64_t>(bounds.size()) - 1;
  }
};

// The real tokens of row b as an [Nr, D] tensor of the accumulation type: a view
// of h when they are one run and already that type, else gathered into `buf`.
template <typename scalar_t>
at::Tensor gather_real(const at::Tensor& h, const RealTokens& rt, int64_t b, at::Tensor& buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t nr = rt.count(b), D = h.size(2);
  if (std::is_same_v<scalar_t, acc_t> && rt.one_run[b])
    return h[b].narrow(0, nr ? rt.positions(b)[0] : 0, nr);
  at::Tensor out = buf.narrow(0, 0, nr * D).view({nr, D});
  const scalar_t* src = h.data_ptr<scalar_t>() + b * h.size(1) * D;
  acc_t* dst = out.data_ptr<acc_t>();
  const int64_t* pos = rt.positions(b);
  for (int64_t j = 0; j < nr; ++j)
    for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<acc_t>(src[pos[j] * D + d]);
  return out;
}

// rows [l0, l0+n) of a [.., D] tensor of scalar_t as the accumulation type
// (a view when no conversion is needed, else copied into `buf`).
template <typename scalar_t>
at::Tensor rows_as_acc(const at::Tensor& x, int64_t l0, int64_t n, at::Tensor& buf) {
  using acc_t = acc_type<scalar_t>;
  if (std::is_same_v<scalar_t, acc_t>) return x.narrow(0, l0, n);
  const int64_t D = x.size(1);
  at::Tensor out = buf.narrow(0, 0, n * D).view({n, D});
  const scalar_t* src = x.data_ptr<scalar_t>() + l0 * D;
  acc_t* dst = out.data_ptr<acc_t>();
  for (int64_t i = 0; i < n * D; ++i) dst[i] = static_cast<acc_t>(src[i]);
  return out;
}

// Reductions over a row, split over 8 lanes so that they vectorize (or at
// least pipeline) without reassociation flags.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t>
acc_t row_sum(const acc_t* a, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k];
  for (; i < n; ++i) s[0] += a[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t>
acc_t row_max(const acc_t* a, int64_t n, acc_t init) {
  acc_t s[8] = {init, init, init, init, init, init, init, init};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] = std::max(s[k], a[i + k]);
  for (; i < n; ++i) s[0] = std::max(s[0], a[i]);
  return std::max(std::max(std::max(s[0], s[1]), std::max(s[2], s[3])),
                  std::max(std::max(s[4], s[5]), std::max(s[6], s[7])));
}

void check_inputs(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W) {
  TORCH_CHECK_VALUE(h.dim() == 3 && mask.dim() == 2 && W.dim() == 2,
                    "label_attention: expected h [B,N,D], mask [B,N], W [L,D]; got h ", h.sizes(),
                    ", mask ", mask.sizes(), ", W ", W.sizes());
  TORCH_CHECK_VALUE(mask.size(0) == h.size(0) && mask.size(1) == h.size(1),
                    "label_attention: mask must be [B,N] = ", h.sizes().slice(0, 2), ", got ", mask.sizes());
  TORCH_CHECK_VALUE(W.size(1) == h.size(2), "label_attention: W must be [L, D=", h.size(2), "], got ",
                    W.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, "label_attention: mask must be bool, got ",
                    mask.scalar_type());
  TORCH_CHECK_VALUE(W.scalar_type() == h.scalar_type(), "label_attention: W must have h's dtype (",
                    h.scalar_type(), "), got ", W.scalar_type());
  const auto t = h.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                    "label_attention: h must be float32, bfloat16, float16 or float64, got ", t);
  TORCH_CHECK_VALUE(h.device().is_cpu() && mask.device().is_cpu() && W.device().is_cpu(),
                    "label_attention: all inputs must be on the CPU");
}

template <typename scalar_t>
void forward_impl(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, at::Tensor& ctx,
                  at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Plan plan(h, mask, W, acc_dtype);
  const int64_t N = plan.N, D = plan.D, L = plan.L, nlb = plan.nlb;
  const RealTokens& rt = plan.rt;
  const at::Tensor& Wa = plan.Wa;
  const auto& bounds = plan.bounds;

  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    const auto opt = h.options().dtype(acc_dtype);
    at::Tensor hbuf = at::empty({N * D}, opt);
    at::Tensor sbuf = at::empty({kLabelBlock * kTokenTile}, opt);
    at::Tensor abuf = at::empty({kLabelBlock * D}, opt);
    std::vector<acc_t> mx(kLabelBlock), sum(kLabelBlock), scale(kLabelBlock);
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cur_b = -1;
      at::Tensor hc;
      for (int64_t task = bounds[p]; task < bounds[p + 1]; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * kLabelBlock;
        const int64_t lb = std::min(kLabelBlock, L - l0), nr = rt.count(b);
        if (b != cur_b) {
          hc = gather_real<scalar_t>(h, rt, b, hbuf);
          cur_b = b;
        }
        scalar_t* out = ctx.data_ptr<scalar_t>() + (b * L + l0) * D;
        float* lse_out = lse.data_ptr<float>() + b * L + l0;
        if (nr == 0) {  // no real token: zero context, lse = +inf
          std::fill(out, out + lb * D, scalar_t(0));
          std::fill(lse_out, lse_out + lb, std::numeric_limits<float>::infinity());
          continue;
        }
        const at::Tensor Wb = Wa.narrow(0, l0, lb);
        // float32 / float64 accumulate straight into ctx
        at::Tensor acc = std::is_same_v<scalar_t, acc_t> ? ctx[b].narrow(0, l0, lb)
                                                         : abuf.narrow(0, 0, lb * D).view({lb, D});
        acc_t* a = acc.data_ptr<acc_t>();
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t t0 = 0; t0 < nr; t0 += kTokenTile) {
          const int64_t n = std::min(kTokenTile, nr - t0);
          const at::Tensor ht = hc.narrow(0, t0, n);
          at::Tensor S = sbuf.narrow(0, 0, lb * n).view({lb, n});
          at::mm_out(S, Wb, ht.t());
          // online softmax: new row maxima, exponentials of the tile (ATen's exp,
          // vectorized for the running CPU), rescale of the earlier tiles' sums
          acc_t* s = S.data_ptr<acc_t>();
          for (int64_t i = 0; i < lb; ++i) {
            acc_t* row = s + i * n;
            const acc_t m = row_max(row, n, mx[i]);
            for (int64_t j = 0; j < n; ++j) row[j] -= m;
            scale[i] = std::exp(mx[i] - m);  // 0 on the first tile
            mx[i] = m;
          }
          S.exp_();
          for (int64_t i = 0; i < lb; ++i) sum[i] = sum[i] * scale[i] + row_sum(s + i * n, n);
          if (t0 == 0) {
            at::mm_out(acc, S, ht);
          } else {
            for (int64_t i = 0; i < lb; ++i)
              for (int64_t d = 0; d < D; ++d) a[i * D + d] *= scale[i];
            acc.addmm_(S, ht);
          }
        }
        for (int64_t i = 0; i < lb; ++i) {
          const acc_t inv = acc_t(1) / sum[i];
          for (int64_t d = 0; d < D; ++d) out[i * D + d] = static_cast<scalar_t>(a[i * D + d] * inv);
          lse_out[i] = static_cast<float>(mx[i] + std::log(sum[i]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> label_attention_cpu(const at::Tensor& h_in, const at::Tensor& mask_in,
                                                       const at::Tensor& W_in) {
  check_inputs(h_in, mask_in, W_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls on tiles are not recorded
  const at::Tensor h = h_in.contiguous(), mask = mask_in.contiguous(), W = W_in.contiguous();
  const int64_t B = h.size(0), D = h.size(2), L = W.size(0);
  at::Tensor ctx = at::empty({B, L, D}, h.options());
  at::Tensor lse = at::empty({B, L}, h.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention", [&] {
    forward_impl<scalar_t>(h, mask, W, ctx, lse);
  });
  return {ctx, lse};
}

// Backward. With p = exp(s - lse) and ds = p * (grad_ctx[l].h_n - grad_ctx[l].ctx[l]):
//   grad_h[b,n] = sum_l p grad_ctx[b,l] + ds W[l],   grad_W[l] = sum_{b,n} ds h[b,n].
// Races: the tasks are split into per-thread ranges in b-major order, so a
// thread sees every label block of most of its rows. grad_W gets one float
// accumulator per thread ([L,D]: small beside the activations), summed in
// thread order afterwards. grad_h of a row is owned by the thread whose range
// covers all of that row's tasks and written once; a row cut between two
// ranges (at most two per thread) is handed back as a partial sum and added
// after the parallel region. Fixed reduction order: results do not depend on
// scheduling.
template <typename scalar_t>
void backward_impl(const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask,
                   const at::Tensor& W, const at::Tensor& ctx, const at::Tensor& lse, at::Tensor& grad_h,
                   at::Tensor& grad_W) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Plan plan(h, mask, W, acc_dtype);
  const int64_t B = plan.B, N = plan.N, D = plan.D, L = plan.L, nlb = plan.nlb;
  const RealTokens& rt = plan.rt;
  const at::Tensor& Wa = plan.Wa;
  const auto& bounds = plan.bounds;
  const int64_t parts = plan.parts;
  const auto opt = h.options().dtype(acc_dtype);
  at::Tensor gW_parts = at::empty({parts, L, D}, opt);
  std::vector<std::vector<std::pair<int64_t, at::Tensor>>> cut_rows(parts);

  auto write_row = [&](int64_t b, const acc_t* g) {  // compact [Nr,D] -> grad_h[b] (padding stays 0)
    scalar_t* dst = grad_h.data_ptr<scalar_t>() + b * N * D;
    const int64_t* pos = rt.positions(b);
    for (int64_t j = 0; j < rt.count(b); ++j)
      for (int64_t d = 0; d < D; ++d) dst[pos[j] * D + d] = static_cast<scalar_t>(g[j * D + d]);
  };

  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set in each worker
    at::Tensor hbuf = at::empty({N * D}, opt), ghbuf = at::empty({N * D}, opt);
    at::Tensor sbuf = at::empty({kLabelBlock * kTokenTile}, opt);
    at::Tensor dsbuf = at::empty({kLabelBlock * kTokenTile}, opt);
    at::Tensor gbuf = at::empty({kLabelBlock * D}, opt), cbuf = at::empty({kLabelBlock * D}, opt);
    std::vector<acc_t> delta(kLabelBlock);
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor gW = gW_parts[p];
      gW.zero_();
      const int64_t first = bounds[p], last = bounds[p + 1];
      int64_t cur_b = -1;
      at::Tensor hc, gh;
      auto flush = [&] {
        if (cur_b < 0 || rt.count(cur_b) == 0) return;
        const bool whole = cur_b * nlb >= first && (cur_b + 1) * nlb <= last;
        if (whole)
          write_row(cur_b, gh.data_ptr<acc_t>());
        else
          cut_rows[p].emplace_back(cur_b, gh.clone());
      };
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / nlb, l0 = (task % nlb) * kLabelBlock;
        const int64_t lb = std::min(kLabelBlock, L - l0), nr = rt.count(b);
        if (b != cur_b) {
          flush();
          cur_b = b;
          hc = gather_real<scalar_t>(h, rt, b, hbuf);
          gh = ghbuf.narrow(0, 0, nr * D).view({nr, D});
          gh.zero_();
        }
        if (nr == 0) continue;
        const at::Tensor Wb = Wa.narrow(0, l0, lb);
        const at::Tensor go = rows_as_acc<scalar_t>(grad_ctx[b], l0, lb, gbuf);
        const at::Tensor cx = rows_as_acc<scalar_t>(ctx[b], l0, lb, cbuf);
        const acc_t* gop = go.data_ptr<acc_t>();
        const acc_t* cxp = cx.data_ptr<acc_t>();
        const float* lse_b = lse.data_ptr<float>() + b * L + l0;
        for (int64_t i = 0; i < lb; ++i) delta[i] = dot(gop + i * D, cxp + i * D, D);
        at::Tensor gWb = gW.narrow(0, l0, lb);
        for (int64_t t0 = 0; t0 < nr; t0 += kTokenTile) {
          const int64_t n = std::min(kTokenTile, nr - t0);
          const at::Tensor ht = hc.narrow(0, t0, n);
          at::Tensor P = sbuf.narrow(0, 0, lb * n).view({lb, n});
          at::Tensor dS = dsbuf.narrow(0, 0, lb * n).view({lb, n});
          at::mm_out(P, Wb, ht.t());
          at::mm_out(dS, go, ht.t());
          acc_t* pp = P.data_ptr<acc_t>();
          acc_t* dp = dS.data_ptr<acc_t>();
          for (int64_t i = 0; i < lb; ++i) {  // P = exp(S - lse)
            const acc_t m = static_cast<acc_t>(lse_b[i]);
            for (int64_t j = 0; j < n; ++j) pp[i * n + j] -= m;
          }
          P.exp_();
          for (int64_t i = 0; i < lb; ++i) {  // dS = P * (dP - delta)
            const acc_t dl = delta[i];
            for (int64_t j = 0; j < n; ++j) dp[i * n + j] = pp[i * n + j] * (dp[i * n + j] - dl);
          }
          at::Tensor gt = gh.narrow(0, t0, n);
          gt.addmm_(P.t(), go);
          gt.addmm_(dS.t(), Wb);
          gWb.addmm_(dS, ht);
        }
      }
      flush();
    }
  });

  // rows cut between thread ranges: partial sums added in range order
  std::vector<at::Tensor> row_sum(B);
  for (auto& rows : cut_rows)
    for (auto& [b, g] : rows) row_sum[b] = row_sum[b].defined() ? row_sum[b].add_(g) : g;
  for (int64_t b = 0; b < B; ++b)
    if (row_sum[b].defined()) write_row(b, row_sum[b].data_ptr<acc_t>());
  at::Tensor gW = parts == 1 ? gW_parts[0] : at::sum(gW_parts, 0);
  grad_W.copy_(gW);
}

std::tuple<at::Tensor, at::Tensor> label_attention_backward_cpu(const at::Tensor& grad_ctx_in,
                                                                const at::Tensor& h_in,
                                                                const at::Tensor& mask_in,
                                                                const at::Tensor& W_in,
                                                                const at::Tensor& ctx_in,
                                                                const at::Tensor& lse_in) {
  check_inputs(h_in, mask_in, W_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = h_in.size(0), D = h_in.size(2), L = W_in.size(0);
  const std::vector<int64_t> ctx_shape{B, L, D}, lse_shape{B, L};
  TORCH_CHECK_VALUE(grad_ctx_in.sizes() == ctx_shape && ctx_in.sizes() == ctx_shape,
                    "label_attention: grad_ctx and ctx must be [B,L,D] = ", ctx_shape, ", got ",
                    grad_ctx_in.sizes(), " and ", ctx_in.sizes());
  TORCH_CHECK_VALUE(grad_ctx_in.scalar_type() == h_in.scalar_type() && ctx_in.scalar_type() == h_in.scalar_type(),
                    "label_attention: grad_ctx and ctx must have h's dtype (", h_in.scalar_type(), "), got ",
                    grad_ctx_in.scalar_type(), " and ", ctx_in.scalar_type());
  TORCH_CHECK_VALUE(lse_in.sizes() == lse_shape && lse_in.scalar_type() == at::kFloat,
                    "label_attention: lse must be float32 [B,L] = ", lse_shape, ", got ", lse_in.scalar_type(),
                    " ", lse_in.sizes());
  const at::Tensor grad_ctx = grad_ctx_in.contiguous(), h = h_in.contiguous(), mask = mask_in.contiguous(),
                   W = W_in.contiguous(), ctx = ctx_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor grad_h = at::zeros_like(h);
  at::Tensor grad_W = at::empty_like(W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_backward", [&] {
    backward_impl<scalar_t>(grad_ctx, h, mask, W, ctx, lse, grad_h, grad_W);
  });
  return {grad_h, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("label_attention", &label_attention_cpu);
  m.impl("label_attention_backward", &label_attention_backward_cpu);
}
