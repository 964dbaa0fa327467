// The attention head in training, on the CPU: score[b,l] = relu_dropout_dot(label_attention(h, mask, W,
// v), w, p, seed)[b,l] in one op. At short texts the two ops move the [B,L,Dv] context and its gradient
// through memory five times a step (written, read, its gradient written and read, the context read
// again): more time than their arithmetic. Here, on the packed path (label_attention_plan.h: float32
// on AVX-512, rows of at most kShortRow real tokens, D and Dv at most kShortWidth), the context of a
// (row, label block) lives in a per-thread tile and only [B,L]-sized results leave it:
//
//   forward:  per tile, the context C = P V [lb, Dv]; the dropout lanes of its elements (the stream of
//             dropout_mask.h at the context's element indices (b L + l) Dv + d: the two ops' mask)
//             and the gate bits k = (C > 0 and kept); score = scale sum_d w[d] C[., d] k. Written:
//             score, lse, and the gate, one bit an element (1/32 of the context).
//   backward: the context's gradient is G[l,d] = g[b,l] scale k[l,d] w[d]. With G' = g scale k (no w),
//             dP = G V^T = G' (V w)^T, and Q = P^T G' [tokens, Dv] summed over the labels,
//             grad_v = Q w and grad_w = sum over tokens of V Q: the context is never recomputed. The
//             rest is label_attention's packed backward (scores recomputed from lse, dS, grad_h,
//             grad_W), reading G' from the gate bits instead of a [B,L,Dv] gradient from memory.
//
// Elsewhere (other dtypes, longer rows, wider states, no AVX-512) the op runs label_attention's
// kernels: forward, then the score and gate from the context; the backward recomputes the context
// with the forward kernel and hands label_attention_backward its gradient. Correct, but slower than
// the two ops (one forward more): ops.label_attention_head chooses this op only where the packed path
// runs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dropout_mask.h"
#include "avx512.h"
#include "dropout_bits.h"
#include "label_attention_plan.h"
#include "output_buffers.h"

namespace {

using namespace xmcnas_fast::cpu::attention;

constexpr int64_t kRowChunk = 256;  // the generic path's grad_w: partial sums over this many rows, in order

// Gate words a context row: bit d % 16 of word d / 16 says whether element d passes (C > 0 and kept).
int64_t gate_words(int64_t Dv) { return (Dv + 15) / 16; }

struct Drop {
  uint64_t seed;
  uint32_t thr;  // dropout_mask.h's threshold; 0: nothing is dropped
  double scale;
};

Drop make_drop(double p, const at::Tensor& seed) {
  Drop d;
  d.seed = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  d.thr = xmcnas_fast::dropout_threshold(p);
  d.scale = xmcnas_fast::dropout_scale(d.thr);
  return d;
}

void check_head_inputs(const char* op, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                       const at::Tensor& v, const at::Tensor& w, double p, const at::Tensor& seed) {
  xmcnas_fast::checks::label_attention_inputs(h, mask, W, v, op);
  xmcnas_fast::checks::dropout_inputs(op, h, p, seed);
  xmcnas_fast::checks::head_weights(op, h, w, v.size(2));
}

// label_attention's own kernels, through the dispatcher (the generic path only: once a call).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                                                     const at::Tensor& v) {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("xmcnas_fast::label_attention", "")
                              .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                        const at::Tensor&,
                                                                        const std::optional<at::Tensor>&)>();
  return op.call(h, mask, W, v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_ctx, const at::Tensor& h,
                                                                  const at::Tensor& mask, const at::Tensor& W,
                                                                  const at::Tensor& v, const at::Tensor& ctx,
                                                                  const at::Tensor& lse) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("xmcnas_fast::label_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_ctx, h, mask, W, v, ctx, lse);
}

// ---- the generic path ----------------------------------------------------------------------------

// score and gate of the context rows ctx [B*L, Dv] (any dtype; w float32 or ctx's).
template <typename scalar_t, typename wscalar_t>
void score_and_gate(const at::Tensor& ctx, const at::Tensor& w, const Drop& dr, at::Tensor& score, at::Tensor& gate) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Dv = ctx.size(2), rows = ctx.size(0) * ctx.size(1), G = gate_words(Dv);
  const scalar_t* c = ctx.const_data_ptr<scalar_t>();
  const wscalar_t* wp = w.const_data_ptr<wscalar_t>();
  scalar_t* sp = score.mutable_data_ptr<scalar_t>();
  int16_t* gp = gate.mutable_data_ptr<int16_t>();
  const opmath_t sc = static_cast<opmath_t>(dr.scale);
  at::parallel_for(0, rows, kRowChunk, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      opmath_t acc = 0;
      std::fill(gp + r * G, gp + (r + 1) * G, int16_t(0));
      for (int64_t d = 0; d < Dv; ++d) {
        const uint64_t i = static_cast<uint64_t>(r * Dv + d);
        const opmath_t x = static_cast<opmath_t>(c[r * Dv + d]);
        if (!(x > 0) || (dr.thr != 0 && !xmcnas_fast::dropout_keep(dr.seed, i, dr.thr))) continue;
        acc += static_cast<opmath_t>(wp[d]) * (x * sc);
        gp[r * G + d / 16] = static_cast<int16_t>(gp[r * G + d / 16] | (1 << (d % 16)));
      }
      sp[r] = static_cast<scalar_t>(acc);
    }
  });
}

// The context's gradient [B*L, Dv] from the gate, and grad_w = sum over rows of it times the context / w
// (partial sums over kRowChunk rows, added in order: the same bits whatever the thread count).
template <typename scalar_t, typename wscalar_t>
void context_grad(const at::Tensor& grad, const at::Tensor& ctx, const at::Tensor& gate, const at::Tensor& w,
                  const Drop& dr, at::Tensor& grad_ctx, at::Tensor& grad_w) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Dv = ctx.size(2), rows = ctx.size(0) * ctx.size(1), G = gate_words(Dv);
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  const scalar_t* c = ctx.const_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int16_t* gp = gate.const_data_ptr<int16_t>();
  const wscalar_t* wp = w.const_data_ptr<wscalar_t>();
  scalar_t* gc = grad_ctx.mutable_data_ptr<scalar_t>();
  std::vector<opmath_t> partial(static_cast<size_t>(chunks * Dv), opmath_t(0));
  const opmath_t sc = static_cast<opmath_t>(dr.scale);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      opmath_t* acc = partial.data() + ci * Dv;
      for (int64_t r = ci * kRowChunk; r < std::min(rows, (ci + 1) * kRowChunk); ++r) {
        const opmath_t gr = static_cast<opmath_t>(g[r]);
        for (int64_t d = 0; d < Dv; ++d) {
          const bool k = (gp[r * G + d / 16] >> (d % 16)) & 1;
          const opmath_t gk = k ? gr * sc : opmath_t(0);
          acc[d] += gk * static_cast<opmath_t>(c[r * Dv + d]);
          gc[r * Dv + d] = static_cast<scalar_t>(gk * static_cast<opmath_t>(wp[d]));
        }
      }
    }
  });
  std::vector<opmath_t> sum(static_cast<size_t>(Dv), opmath_t(0));
  for (int64_t ci = 0; ci < chunks; ++ci)
    for (int64_t d = 0; d < Dv; ++d) sum[d] += partial[ci * Dv + d];
  wscalar_t* gw = grad_w.mutable_data_ptr<wscalar_t>();
  for (int64_t d = 0; d < Dv; ++d) gw[d] = static_cast<wscalar_t>(sum[d]);
}

// Calls f.template operator()<scalar_t, wscalar_t>() for h's dtype and w's (float32 or h's).
template <typename F>
void dispatch(const at::Tensor& h, const at::Tensor& w, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "label_attention_head", [&] {
    if (w.scalar_type() == h.scalar_type())
      f.template operator()<scalar_t, scalar_t>();
    else
      f.template operator()<scalar_t, float>();
  });
}

// ---- the packed path -----------------------------------------------------------------------------

#if XMCNAS_HAS_AVX512_CODE
// A context tile c [lb, Dv] (row b, labels from l0; its first element e0 = (b L + l0) Dv): the scores
// scale sum_d w[d] c[i,d] k[i,d] and the gate bits k into gate [lb, G]. words: scratch for the tile's
// dropout words.
XMCNAS_AVX512 void tile_epilogue(const float* c, int64_t lb, int64_t Dv, const float* w, const Drop& dr, int64_t e0,
                                 uint64_t* words, float* score, int16_t* gate) {
  const int64_t G = gate_words(Dv);
  const uint16_t* lanes = nullptr;  // lanes[k]: the 16-bit lane of element e0 + k
  if (dr.thr != 0) {
    const uint64_t g0 = static_cast<uint64_t>(e0) >> 2;
    const int64_t count = static_cast<int64_t>(((static_cast<uint64_t>(e0 + lb * Dv) + 3) >> 2) - g0);
    xmcnas_fast::cpu::chunk_bits_avx512(dr.seed, g0, count, words);
    lanes = reinterpret_cast<const uint16_t*>(words) + (e0 - 4 * static_cast<int64_t>(g0));
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(dr.thr));
  const float sc = static_cast<float>(dr.scale);
  for (int64_t i = 0; i < lb; ++i) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dv; d += 16) {
      const __mmask16 m = xmcnas_fast::cpu::first_lanes(Dv - d);
      const __m512 x = _mm512_maskz_loadu_ps(m, c + i * Dv + d);
      __mmask16 k = _mm512_mask_cmp_ps_mask(m, x, _mm512_setzero_ps(), _CMP_GT_OQ);
      if (lanes != nullptr)
        k = _mm512_mask_cmpge_epu32_mask(k, _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lanes + i * Dv + d)),
                                         thr);
      acc = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, w + d), x, acc, k);
      gate[i * G + d / 16] = static_cast<int16_t>(k);
    }
    score[i] = _mm512_reduce_add_ps(acc) * sc;
  }
}

void forward_packed(const Plan& plan, const at::Tensor& h, const at::Tensor& v, const float* w, const Drop& dr,
                    float* score, float* lse, int16_t* gate) {
  const int64_t Dv = v.size(2), L = plan.L, G = gate_words(Dv);
  const auto no_tile = [](int64_t, int64_t) { return static_cast<float*>(nullptr); };
  packed_forward_tiles<float>(
      plan, h, v, no_tile, [&](int64_t b, int64_t l0) { return lse + b * L + l0; },
      [&] {
        // per thread: the dropout words of a tile
        std::vector<uint64_t> words(dr.thr == 0 ? 0 : (plan.lb * Dv + 3) / 4 + 2);
        return [&, words = std::move(words)](int64_t b, int64_t l0, int64_t lb, const float* c) mutable {
          const int64_t q = b * L + l0;
          tile_epilogue(c, lb, Dv, w, dr, q * Dv, words.data(), score + q, gate + q * G);
        };
      },
      [&](int64_t b, int64_t l0, int64_t lb) {  // no real token: a zero context
        const int64_t q = b * L + l0;
        std::fill(score + q, score + q + lb, 0.0f);
        std::fill(lse + q, lse + q + lb, std::numeric_limits<float>::infinity());
        std::fill(gate + q * G, gate + (q + lb) * G, int16_t(0));
      });
}

// G' [lb, Dv] = g[i] scale where the gate is set, else 0.
XMCNAS_AVX512 void gate_grad(const int16_t* gate, const float* g, int64_t lb, int64_t Dv, float scale, float* out) {
  const int64_t G = gate_words(Dv);
  for (int64_t i = 0; i < lb; ++i) {
    const __m512 gi = _mm512_set1_ps(g[i] * scale);
    for (int64_t d = 0; d < Dv; d += 16) {
      const __mmask16 m = xmcnas_fast::cpu::first_lanes(Dv - d);
      const __mmask16 k = static_cast<__mmask16>(static_cast<uint16_t>(gate[i * G + d / 16]));
      _mm512_mask_storeu_ps(out + i * Dv + d, m, _mm512_maskz_mov_ps(k, gi));
    }
  }
}

// The packed backward of the tasks [first, last): label_attention's (label_attention.cpp), with the
// context's gradient made from the gate (G'), the values scaled by w for dP, and Q = P^T G' in place of
// grad_v until a unit is left: then grad_v = Q w and gw += sum over the unit's tokens of V Q.
void backward_packed_range(const Plan& plan, int64_t first, int64_t last, const float* g, const at::Tensor& h,
                           const at::Tensor& v, const float* w, const Drop& dr, const float* lse_all,
                           const int16_t* gate, float* gW, float* gw, at::Tensor& grad_h, at::Tensor& grad_v,
                           std::vector<CutRow>& cut) {
  using xmcnas_fast::cpu::gemm_avx512;
  const int64_t D = plan.D, Dv = v.size(2), L = plan.L, lbk = plan.lb, nlb = plan.nlb, R_max = plan.max_group_tokens,
                np_max = plan.np_max, G = gate_words(Dv);
  const float* Wa = plan.Wa.data_ptr<float>();
  const float scale = static_cast<float>(dr.scale);
  // the unit's tokens hs [R, D], values vs [R, Dv], (V w)^T [Dv, R]; gh [R, D], Q [R, Dv]; S^T, dP^T
  // [R, lb]; dP [lb, Np]; G' [lb, Dv]
  std::vector<float> buf(2 * R_max * D + 3 * R_max * Dv + 2 * R_max * lbk + lbk * np_max + lbk * Dv);
  std::vector<int64_t> row0(plan.max_group_rows);
  float* const hs = buf.data();
  float* const gh = hs + R_max * D;
  float* const vs = gh + R_max * D;
  float* const vwT = vs + R_max * Dv;
  float* const Q = vwT + R_max * Dv;
  float* const st = Q + R_max * Dv;
  float* const dpt = st + R_max * lbk;
  float* const dp = dpt + R_max * lbk;
  float* const gk = dp + lbk * np_max;
  int64_t cur_u = -1, R = 0;
  auto leave = [&] {
    if (cur_u < 0) return;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < Dv; ++d) {
        gw[d] += vs[r * Dv + d] * Q[r * Dv + d];
        Q[r * Dv + d] *= w[d];
      }
    leave_unit<float>(plan, cur_u, first, last, row0.data(), gh, Q, Dv, true, grad_h, grad_v, cut);
  };
  for (int64_t task = first; task < last; ++task) {
    const int64_t u = task / nlb, l0 = (task % nlb) * lbk, lb = std::min(lbk, L - l0);
    if (u != cur_u) {
      leave();
      cur_u = u;
      R = gather_unit<float>(plan, u, h, hs, row0.data());
      gather_unit<float>(plan, u, v, vs, row0.data());
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < Dv; ++d) vwT[d * R + r] = vs[r * Dv + d] * w[d];
      std::fill(gh, gh + R * D, 0.0f);
      std::fill(Q, Q + R * Dv, 0.0f);
    }
    if (R == 0) continue;
    scores_t(plan, hs, R, l0, lb, st);  // S^T = H W^T
    for (int64_t b = plan.group[u]; b < plan.group[u + 1]; ++b) {
      const int64_t nr = plan.rt.count(b), r0 = row0[b - plan.group[u]], q = b * L + l0;
      if (nr == 0) continue;
      gate_grad(gate + q * G, g + q, lb, Dv, scale, gk);
      gemm_avx512(lb, nr, Dv, gk, Dv, 1, vwT + r0, R, dp, nr, false);  // dP = G' (V w)^T
      for (int64_t n = 0; n < nr; ++n)                                  // dP^T
        for (int64_t l = 0; l < lb; ++l) dpt[(r0 + n) * lb + l] = dp[l * nr + n];
      exp_grad_columns(st + r0 * lb, dpt + r0 * lb, nr, lb, lse_all + q);
      gemm_avx512(nr, Dv, lb, st + r0 * lb, lb, 1, gk, Dv, Q + r0 * Dv, Dv, true);  // Q += P^T G'
    }
    gemm_avx512(R, D, lb, dpt, lb, 1, Wa + l0 * D, D, gh, D, true);  // grad_h += dS^T W
    gemm_avx512(lb, D, R, dpt, 1, lb, hs, D, gW + l0 * D, D, true);  // grad_W += dS H
  }
  leave();
}

void backward_packed(const Plan& plan, const at::Tensor& grad, const at::Tensor& h, const at::Tensor& v,
                     const at::Tensor& w, const Drop& dr, const at::Tensor& lse, const at::Tensor& gate,
                     at::Tensor& grad_h, at::Tensor& grad_W, at::Tensor& grad_v, at::Tensor& grad_w) {
  const int64_t L = plan.L, D = plan.D, Dv = v.size(2);
  std::vector<at::Tensor> gW_parts(plan.parts);
  for (int64_t p = 0; p < plan.parts; ++p) gW_parts[p] = p == 0 ? grad_W : at::empty({L, D}, grad_W.options());
  std::vector<std::vector<float>> gw_parts(plan.parts, std::vector<float>(Dv, 0.0f));
  std::vector<std::vector<CutRow>> cut_rows(plan.parts);
  at::parallel_for(0, plan.parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* const gW = gW_parts[p].data_ptr<float>();
      std::fill(gW, gW + L * D, 0.0f);
      backward_packed_range(plan, plan.bounds[p], plan.bounds[p + 1], grad.const_data_ptr<float>(), h, v,
                            w.const_data_ptr<float>(), dr, lse.const_data_ptr<float>(), gate.const_data_ptr<int16_t>(),
                            gW, gw_parts[p].data(), grad_h, grad_v, cut_rows[p]);
    }
  });
  add_cut_rows<float, float>(cut_rows, plan.rt, plan.B, true, grad_h, grad_v);
  for (int64_t p = 1; p < plan.parts; ++p) gW_parts[0].add_(gW_parts[p]);
  float* gwp = grad_w.mutable_data_ptr<float>();
  std::fill(gwp, gwp + Dv, 0.0f);
  for (int64_t p = 0; p < plan.parts; ++p)
    for (int64_t d = 0; d < Dv; ++d) gwp[d] += gw_parts[p][d];
}
#endif

// The packed path's plan, or nothing where it does not run (not float32 with a float32 w, longer rows,
// wider states, no AVX-512).
std::optional<Plan> packed_plan(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W, const at::Tensor& v,
                                const at::Tensor& w) {
#if XMCNAS_HAS_AVX512_CODE
  if (h.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || !has_avx512()) return std::nullopt;
  if (h.size(2) > kShortWidth || v.size(2) > kShortWidth) return std::nullopt;
  Plan plan(h, mask, W, v.size(2), at::kFloat);
  if (plan.packed) return plan;
#endif
  return std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_head_cpu(const at::Tensor& h_in,
                                                                        const at::Tensor& mask_in,
                                                                        const at::Tensor& W_in, const at::Tensor& v_in,
                                                                        const at::Tensor& w_in, double p,
                                                                        const at::Tensor& seed) {
  check_head_inputs("label_attention_head", h_in, mask_in, W_in, v_in, w_in, p, seed);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor h = h_in.contiguous(), mask = mask_in.contiguous(), W = W_in.contiguous(), v = v_in.contiguous(),
                   w = w_in.contiguous();
  const int64_t B = h.size(0), L = W.size(0), Dv = v.size(2);
  const Drop dr = make_drop(p, seed);
  at::Tensor score = at::empty({B, L}, h.options());
  at::Tensor gate = at::empty({B, L, gate_words(Dv)}, h.options().dtype(at::kShort));
#if XMCNAS_HAS_AVX512_CODE
  if (const auto plan = packed_plan(h, mask, W, v, w)) {
    at::Tensor lse = at::empty({B, L}, h.options().dtype(at::kFloat));
    forward_packed(*plan, h, v, w.const_data_ptr<float>(), dr, score.mutable_data_ptr<float>(),
                   lse.mutable_data_ptr<float>(), gate.mutable_data_ptr<int16_t>());
    return {score, lse, gate};
  }
#endif
  auto [ctx, lse] = attention_forward(h, mask, W, v);
  dispatch(h, w, [&]<typename S, typename WS>() { score_and_gate<S, WS>(ctx, w, dr, score, gate); });
  return {score, lse, gate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_attention_head_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& mask_in, const at::Tensor& W_in,
    const at::Tensor& v_in, const at::Tensor& w_in, double p, const at::Tensor& seed, const at::Tensor& lse_in,
    const at::Tensor& gate_in) {
  const char* op = "label_attention_head_backward";
  check_head_inputs(op, h_in, mask_in, W_in, v_in, w_in, p, seed);
  const int64_t B = h_in.size(0), L = W_in.size(0), Dv = v_in.size(2);
  const std::vector<int64_t> rows{B, L}, gate_shape{B, L, gate_words(Dv)};
  TORCH_CHECK_VALUE(grad_in.sizes() == rows && grad_in.scalar_type() == h_in.scalar_type(), op,
                    ": grad must be [B,L] = ", at::IntArrayRef(rows), " in h's dtype, got ",
                    xmcnas_fast::checks::dtype_name(grad_in.scalar_type()), " ", grad_in.sizes());
  TORCH_CHECK_VALUE(lse_in.sizes() == rows && lse_in.scalar_type() == at::kFloat, op, ": lse must be float32 [B,L] = ",
                    at::IntArrayRef(rows), ", got ", xmcnas_fast::checks::dtype_name(lse_in.scalar_type()), " ",
                    lse_in.sizes());
  TORCH_CHECK_VALUE(gate_in.sizes() == gate_shape && gate_in.scalar_type() == at::kShort, op,
                    ": gate must be int16 [B,L,(Dv+15)/16] = ", at::IntArrayRef(gate_shape), ", got ",
                    xmcnas_fast::checks::dtype_name(gate_in.scalar_type()), " ", gate_in.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_in.contiguous(), h = h_in.contiguous(), mask = mask_in.contiguous(),
                   W = W_in.contiguous(), v = v_in.contiguous(), w = w_in.contiguous(), lse = lse_in.contiguous(),
                   gate = gate_in.contiguous();
  const Drop dr = make_drop(p, seed);
  at::Tensor grad_w = at::empty_like(w);
#if XMCNAS_HAS_AVX512_CODE
  if (const auto plan = packed_plan(h, mask, W, v, w)) {
    at::Tensor grad_h = at::zeros_like(h), grad_v = at::zeros_like(v), grad_W = at::empty_like(W);
    backward_packed(*plan, grad, h, v, w, dr, lse, gate, grad_h, grad_W, grad_v, grad_w);
    return {grad_h, grad_W, grad_v, grad_w};
  }
#endif
  const at::Tensor ctx = std::get<0>(attention_forward(h, mask, W, v));  // the context again
  at::Tensor grad_ctx = xmcnas_fast::cpu::empty_output(ctx.sizes(), ctx.options());
  dispatch(h, w, [&]<typename S, typename WS>() { context_grad<S, WS>(grad, ctx, gate, w, dr, grad_ctx, grad_w); });
  auto [grad_h, grad_W, grad_v] = attention_backward(grad_ctx, h, mask, W, v, ctx, lse);
  return {grad_h, grad_W, grad_v, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CPU, m) {
  m.impl("label_attention_head", &label_attention_head_cpu);
  m.impl("label_attention_head_backward", &label_attention_head_backward_cpu);
}
