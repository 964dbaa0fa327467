// Label-wise attention on CUDA: entry points, input checks, and the simple
// kernels that serve every dtype and shape (float32 always; float16/bfloat16
// when the tensor-core kernels of label_attention_mma.cu do not apply).
//
//   ctx[b,l] = sum_n softmax_n(W[l] . h[b,n] over real tokens) h[b,n]
//   lse[b,l] = log sum_n exp(W[l] . h[b,n])   (+inf without real tokens; ctx = 0)
//
// Backward, with p = exp(s - lse), delta[b,l] = grad_ctx[b,l] . ctx[b,l]:
//   ds       = p (grad_ctx[b,l] . h[b,n] - delta[b,l])
//   grad_h   = sum_l p grad_ctx[b,l] + ds W[l]
//   grad_W   = sum_b sum_n ds h[b,n]
// Two passes recompute the scores: one over label tiles accumulates grad_W in
// registers (batch items split into G groups, summed afterwards in a fixed
// order), one over token tiles accumulates grad_h. Nothing is atomic, so the
// gradients are bitwise reproducible.
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "label_attention.cuh"
#include "ops.cuh"

namespace xmcnas_fast::cuda::la {
namespace {

constexpr int kWarps = 8;  // warps per block of the simple kernels

// ---------------------------------------------------------------------------
// Real-token lists: idx[b, 0 .. cnt[b]) = positions n with mask[b, n].
// ---------------------------------------------------------------------------

__global__ void compact_mask_kernel(const bool* __restrict__ mask, int* __restrict__ idx, int* __restrict__ cnt,
                                    int B, int N) {
  const int b = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (b >= B) return;
  const bool* mb = mask + static_cast<int64_t>(b) * N;
  int* ib = idx + static_cast<int64_t>(b) * N;
  int total = 0;
  for (int n0 = 0; n0 < N; n0 += 32) {
    const int n = n0 + lane;
    const bool real = n < N && mb[n];
    const unsigned ballot = __ballot_sync(kFullMask, real);
    if (real) ib[total + __popc(ballot & ((1u << lane) - 1u))] = n;
    total += __popc(ballot);
  }
  if (lane == 0) cnt[b] = total;
}

// delta[r] = dO[r] . O[r] over D, one warp per row.
template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ a, const T* __restrict__ o, float* __restrict__ out,
                               int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* ar = a + r * D;
    const T* orow = o + r * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += to_float(ar[d]) * to_float(orow[d]);
    acc = warp_sum(acc);
    if (lane == 0) out[r] = acc;
  }
}

// ---------------------------------------------------------------------------
// Simple kernels. A warp owns R rows (labels, or tokens in the grad_h pass);
// lane i holds the columns d0 + i + 32 v, v < NV, of the D slice [d0, d0 +
// 32 NV). Dot products over the whole of D are lane-strided and summed with
// shuffles; when D fits in one slice the operands are cached in registers,
// otherwise each slice recomputes the scores (correct for any D).
// ---------------------------------------------------------------------------

template <typename T, int NV>
__device__ __forceinline__ void load_slice(float (&v)[NV], const T* row, int d0, int D, int lane) {
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int d = d0 + lane + 32 * i;
    v[i] = (row != nullptr && d < D) ? to_float(row[d]) : 0.f;
  }
}

// Partial (per-lane) dot product of two rows over the whole of D.
template <typename T>
__device__ __forceinline__ float lane_dot(const T* x, const T* y, int D, int lane) {
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_float(x[d]) * to_float(y[d]);
  return acc;
}

// s = x . y and t = z . y over the whole of D, summed over the warp: from the
// cached slices xv, zv, yv when D fits in one, else from memory.
template <typename T, int NV>
__device__ __forceinline__ void two_dots(float& s, float& t, bool one_slice, const float (&xv)[NV],
                                         const float (&zv)[NV], const float (&yv)[NV], const T* x, const T* z,
                                         const T* y, int D, int lane) {
  s = 0.f;
  t = 0.f;
  if (one_slice) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      s += xv[i] * yv[i];
      t += zv[i] * yv[i];
    }
  } else {
    s = lane_dot(x, y, D, lane);
    t = lane_dot(z, y, D, lane);
  }
  s = warp_sum(s);
  t = warp_sum(t);
}

template <typename T, int R, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    fwd_simple_kernel(const T* __restrict__ h, const int* __restrict__ idx, const int* __restrict__ cnt,
                      const T* __restrict__ W, T* __restrict__ ctx, float* __restrict__ lse, int N, int D, int L,
                      int tiles) {
  constexpr int SW = 32 * NV;
  const int lane = threadIdx.x & 31;
  const int b = blockIdx.x / tiles;
  const int l0 = ((blockIdx.x - b * tiles) * kWarps + (threadIdx.x >> 5)) * R;
  if (l0 >= L) return;
  const int nreal = cnt[b];
  const T* hb = h + static_cast<int64_t>(b) * N * D;
  const int* ib = idx + static_cast<int64_t>(b) * N;
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = W + static_cast<int64_t>(min(l0 + r, L - 1)) * D;
  const bool one_slice = D <= SW;

  for (int d0 = 0; d0 == 0 || d0 < D; d0 += SW) {
    float wv[R][NV], o[R][NV], m[R], sum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (one_slice) load_slice<T, NV>(wv[r], wrow[r], 0, D, lane);
      m[r] = -INFINITY;
      sum[r] = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) o[r][i] = 0.f;
    }
    for (int j = 0; j < nreal; ++j) {
      const T* hr = hb + static_cast<int64_t>(ib[j]) * D;
      float hv[NV], s[R];
      load_slice<T, NV>(hv, hr, d0, D, lane);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (one_slice) {
          s[r] = 0.f;
#pragma unroll
          for (int i = 0; i < NV; ++i) s[r] += wv[r][i] * hv[i];
        } else {
          s[r] = lane_dot(wrow[r], hr, D, lane);
        }
        s[r] = warp_sum(s[r]);
        const float mn = fmaxf(m[r], s[r]);
        const float alpha = expf(m[r] - mn);  // 0 on the first token
        const float p = expf(s[r] - mn);
        sum[r] = sum[r] * alpha + p;
        m[r] = mn;
#pragma unroll
        for (int i = 0; i < NV; ++i) o[r][i] = o[r][i] * alpha + p * hv[i];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int l = l0 + r;
      if (l >= L) continue;
      const int64_t row = static_cast<int64_t>(b) * L + l;
      const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        if (d < D) ctx[row * D + d] = from_float<T>(o[r][i] * inv);
      }
      if (d0 == 0 && lane == 0) lse[row] = sum[r] > 0.f ? m[r] + logf(sum[r]) : INFINITY;
    }
  }
}

// grad_W partial sums over the batch items grp, grp + G, ...: ws[grp, l, :].
template <typename T, int R, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    dw_simple_kernel(const T* __restrict__ h, const int* __restrict__ idx, const int* __restrict__ cnt,
                     const T* __restrict__ W, const T* __restrict__ dO, const float* __restrict__ lse,
                     const float* __restrict__ delta, float* __restrict__ ws, int G, int B, int N, int D, int L,
                     int tiles) {
  constexpr int SW = 32 * NV;
  const int lane = threadIdx.x & 31;
  const int grp = blockIdx.x / tiles;
  const int l0 = ((blockIdx.x - grp * tiles) * kWarps + (threadIdx.x >> 5)) * R;
  if (l0 >= L) return;
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = W + static_cast<int64_t>(min(l0 + r, L - 1)) * D;
  const bool one_slice = D <= SW;

  for (int d0 = 0; d0 < D; d0 += SW) {
    float wv[R][NV], acc[R][NV];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (one_slice) load_slice<T, NV>(wv[r], wrow[r], 0, D, lane);
#pragma unroll
      for (int i = 0; i < NV; ++i) acc[r][i] = 0.f;
    }
    for (int b = grp; b < B; b += G) {
      const int nreal = cnt[b];
      const T* hb = h + static_cast<int64_t>(b) * N * D;
      const int* ib = idx + static_cast<int64_t>(b) * N;
      const T* orow[R];
      float ov[R][NV], lse_r[R], del_r[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = static_cast<int64_t>(b) * L + min(l0 + r, L - 1);
        orow[r] = dO + row * D;
        if (one_slice && nreal > 0) load_slice<T, NV>(ov[r], orow[r], 0, D, lane);
        lse_r[r] = l0 + r < L ? lse[row] : INFINITY;
        del_r[r] = delta[row];
      }
      for (int j = 0; j < nreal; ++j) {
        const T* hr = hb + static_cast<int64_t>(ib[j]) * D;
        float hv[NV];
        load_slice<T, NV>(hv, hr, d0, D, lane);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s, dp;
          two_dots<T, NV>(s, dp, one_slice, wv[r], ov[r], hv, wrow[r], orow[r], hr, D, lane);
          const float ds = expf(s - lse_r[r]) * (dp - del_r[r]);
#pragma unroll
          for (int i = 0; i < NV; ++i) acc[r][i] += ds * hv[i];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int l = l0 + r;
      if (l >= L) continue;
      float* out = ws + (static_cast<int64_t>(grp) * L + l) * D;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        if (d < D) out[d] = acc[r][i];
      }
    }
  }
}

// grad_h of the real tokens of one batch item, R tokens per warp, all labels.
template <typename T, int R, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    dh_simple_kernel(const T* __restrict__ h, const int* __restrict__ idx, const int* __restrict__ cnt,
                     const T* __restrict__ W, const T* __restrict__ dO, const float* __restrict__ lse,
                     const float* __restrict__ delta, T* __restrict__ gh, int N, int D, int L, int tiles) {
  constexpr int SW = 32 * NV;
  const int lane = threadIdx.x & 31;
  const int b = blockIdx.x / tiles;
  const int p0 = ((blockIdx.x - b * tiles) * kWarps + (threadIdx.x >> 5)) * R;
  const int nreal = cnt[b];
  if (p0 >= nreal) return;
  const int* ib = idx + static_cast<int64_t>(b) * N;
  const T* hrow[R];
  int64_t grow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    grow[r] = p0 + r < nreal ? static_cast<int64_t>(b) * N + ib[p0 + r] : -1;
    hrow[r] = h + (grow[r] >= 0 ? grow[r] : static_cast<int64_t>(b) * N + ib[p0]) * D;
  }
  const int64_t base = static_cast<int64_t>(b) * L;
  const bool one_slice = D <= SW;

  for (int d0 = 0; d0 < D; d0 += SW) {
    float hv[R][NV], acc[R][NV];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      load_slice<T, NV>(hv[r], hrow[r], d0, D, lane);
#pragma unroll
      for (int i = 0; i < NV; ++i) acc[r][i] = 0.f;
    }
    for (int l = 0; l < L; ++l) {
      const T* wr = W + static_cast<int64_t>(l) * D;
      const T* orow = dO + (base + l) * D;
      const float lse_l = lse[base + l], del_l = delta[base + l];
      float wv[NV], ov[NV];
      load_slice<T, NV>(wv, wr, d0, D, lane);
      load_slice<T, NV>(ov, orow, d0, D, lane);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float s, dp;
        two_dots<T, NV>(s, dp, one_slice, wv, ov, hv[r], wr, orow, hrow[r], D, lane);
        const float p = expf(s - lse_l);
        const float ds = p * (dp - del_l);
#pragma unroll
        for (int i = 0; i < NV; ++i) acc[r][i] += p * ov[i] + ds * wv[i];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (grow[r] < 0) continue;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int d = d0 + lane + 32 * i;
        if (d < D) gh[grow[r] * D + d] = from_float<T>(acc[r][i]);
      }
    }
  }
}

// Two rows a warp over a 512-wide slice of D: one pass when D <= 512 (the
// common width); wider D recomputes the scores once per slice.
constexpr int kRows = 2;
constexpr int kNV = 16;

unsigned grid_of(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "label_attention: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// ---------------------------------------------------------------------------
// Checks and preparation shared by forward and backward.
// ---------------------------------------------------------------------------

struct Inputs {
  at::Tensor h, mask, W;  // contiguous; W in h's dtype; mask bool
  int64_t B, N, D, L;
};

Inputs check_inputs(const char* op, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W) {
  TORCH_CHECK_VALUE(h.dim() == 3, op, ": h must be [B, N, D], got shape ", h.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == h.size(0) && mask.size(1) == h.size(1), op,
                    ": mask must be [B, N] = ", h.sizes().slice(0, 2), ", got ", mask.sizes());
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == h.size(2), op, ": W must be [L, D] with D = ", h.size(2), ", got ",
                    W.sizes());
  TORCH_CHECK_VALUE(h.is_cuda(), op, ": h must be a CUDA tensor");
  check_same_device(op, h, mask, "mask");
  check_same_device(op, h, W, "W");
  TORCH_CHECK_VALUE(is_supported_float(h.scalar_type()), op, ": h must be float32, float16 or bfloat16, got ",
                    h.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(W.scalar_type()), op, ": W must be floating point, got ", W.scalar_type());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  const int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(h.size(0) < lim && h.size(1) < lim && h.size(2) < lim && W.size(0) < lim, op,
                    ": sizes must be below 2^31");
  Inputs in{h.contiguous(), mask.contiguous(), W.to(h.scalar_type()).contiguous(), h.size(0), h.size(1), h.size(2),
            W.size(0)};
  return in;
}

std::tuple<at::Tensor, at::Tensor> compact_mask(const Inputs& in, cudaStream_t stream) {
  auto opts = in.h.options().dtype(at::kInt);
  at::Tensor idx = in.h.new_empty({in.B, in.N}, opts);
  at::Tensor cnt = in.h.new_empty({in.B}, opts);
  compact_mask_kernel<<<grid_of(ceil_div(in.B, kWarps)), kWarps * 32, 0, stream>>>(
      in.mask.const_data_ptr<bool>(), idx.mutable_data_ptr<int>(), cnt.mutable_data_ptr<int>(),
      static_cast<int>(in.B), static_cast<int>(in.N));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx, cnt};
}

bool use_mma(const Inputs& in, std::initializer_list<const at::Tensor*> tensors) {
  if (!mma_eligible(in.h.scalar_type(), in.D, in.h.get_device())) return false;
  for (const at::Tensor* t : tensors) {
    if (!aligned16(t->const_data_ptr())) return false;
  }
  return true;
}

}  // namespace
}  // namespace xmcnas_fast::cuda::la

namespace xmcnas_fast::cuda {
using namespace la;

std::tuple<at::Tensor, at::Tensor> label_attention_cuda(const at::Tensor& h_, const at::Tensor& mask_,
                                                        const at::Tensor& W_) {
  const char* op = "label_attention";
  const Inputs in = check_inputs(op, h_, mask_, W_);
  const c10::cuda::CUDAGuard guard(in.h.device());
  at::Tensor ctx = in.h.new_empty({in.B, in.L, in.D});
  at::Tensor lse = in.h.new_empty({in.B, in.L}, in.h.options().dtype(at::kFloat));
  if (in.B == 0 || in.L == 0) return {ctx, lse};
  if (in.N == 0) {
    ctx.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {ctx, lse};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [idx, cnt] = compact_mask(in, stream);
  const int B = static_cast<int>(in.B), N = static_cast<int>(in.N), D = static_cast<int>(in.D),
            L = static_cast<int>(in.L);

  if (use_mma(in, {&in.h, &in.W, &ctx})) {
    mma_forward(in.h.scalar_type(), in.h.const_data_ptr(), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(),
                in.W.const_data_ptr(), ctx.mutable_data_ptr(), lse.mutable_data_ptr<float>(), B, N, D, L, stream);
    return {ctx, lse};
  }
  dispatch_float_types(in.h.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int tiles = static_cast<int>(ceil_div(L, kWarps * kRows));
    fwd_simple_kernel<T, kRows, kNV><<<grid_of(static_cast<int64_t>(tiles) * B), kWarps * 32, 0, stream>>>(
        cptr<T>(in.h), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(), cptr<T>(in.W), mptr<T>(ctx),
        lse.mutable_data_ptr<float>(), N, D, L, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ctx, lse};
}

std::tuple<at::Tensor, at::Tensor> label_attention_backward_cuda(const at::Tensor& grad_ctx_, const at::Tensor& h_,
                                                                 const at::Tensor& mask_, const at::Tensor& W_,
                                                                 const at::Tensor& ctx_, const at::Tensor& lse_) {
  const char* op = "label_attention_backward";
  const Inputs in = check_inputs(op, h_, mask_, W_);
  const std::vector<int64_t> out_shape{in.B, in.L, in.D};
  TORCH_CHECK_VALUE(grad_ctx_.sizes() == at::IntArrayRef(out_shape), op, ": grad_ctx must be [B, L, D] = ",
                    at::IntArrayRef(out_shape), ", got ", grad_ctx_.sizes());
  TORCH_CHECK_VALUE(ctx_.sizes() == at::IntArrayRef(out_shape), op, ": ctx must be [B, L, D] = ",
                    at::IntArrayRef(out_shape), ", got ", ctx_.sizes());
  TORCH_CHECK_VALUE(lse_.dim() == 2 && lse_.size(0) == in.B && lse_.size(1) == in.L, op, ": lse must be [B, L] = [",
                    in.B, ", ", in.L, "], got ", lse_.sizes());
  check_same_device(op, in.h, grad_ctx_, "grad_ctx");
  check_same_device(op, in.h, ctx_, "ctx");
  check_same_device(op, in.h, lse_, "lse");
  TORCH_CHECK_VALUE(at::isFloatingType(grad_ctx_.scalar_type()) && at::isFloatingType(ctx_.scalar_type()) &&
                        at::isFloatingType(lse_.scalar_type()),
                    op, ": grad_ctx, ctx and lse must be floating point");
  const c10::cuda::CUDAGuard guard(in.h.device());
  const auto st = in.h.scalar_type();
  const at::Tensor dO = grad_ctx_.to(st).contiguous();
  const at::Tensor ctx = ctx_.to(st).contiguous();
  const at::Tensor lse = lse_.to(at::kFloat).contiguous();

  at::Tensor grad_h = in.h.new_zeros(in.h.sizes());  // padding tokens get no gradient
  if (in.B == 0 || in.L == 0 || in.N == 0 || in.D == 0) {
    return {grad_h, W_.new_zeros(W_.sizes())};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [idx, cnt] = compact_mask(in, stream);
  const int B = static_cast<int>(in.B), N = static_cast<int>(in.N), D = static_cast<int>(in.D),
            L = static_cast<int>(in.L);

  at::Tensor delta = lse.new_empty({in.B, in.L});
  dispatch_float_types(st, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t rows = in.B * in.L;
    row_dot_kernel<T><<<grid_of(std::min<int64_t>(ceil_div(rows, kWarps), 65535)), kWarps * 32, 0, stream>>>(
        cptr<T>(dO), cptr<T>(ctx), delta.mutable_data_ptr<float>(), rows, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // grad_W: label tiles x G batch groups, G chosen to fill the GPU twice over.
  const bool mma = use_mma(in, {&in.h, &in.W, &dO});
  const int rows_per_block = mma ? mma_dw_rows_per_block(D) : kWarps * kRows;
  const int64_t label_tiles = ceil_div(L, rows_per_block);
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, in.h.get_device());
  const int G = static_cast<int>(std::clamp<int64_t>(ceil_div(2 * sms, label_tiles), 1, B));
  at::Tensor ws = lse.new_empty({G, in.L, in.D});

  if (mma) {
    mma_backward_dw(st, in.h.const_data_ptr(), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(),
                    in.W.const_data_ptr(), dO.const_data_ptr(), lse.const_data_ptr<float>(),
                    delta.const_data_ptr<float>(), ws.mutable_data_ptr<float>(), G, B, N, D, L, stream);
    mma_backward_dh(st, in.h.const_data_ptr(), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(),
                    in.W.const_data_ptr(), dO.const_data_ptr(), lse.const_data_ptr<float>(),
                    delta.const_data_ptr<float>(), grad_h.mutable_data_ptr(), B, N, D, L, stream);
  } else {
    dispatch_float_types(st, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const int ltiles = static_cast<int>(ceil_div(L, kWarps * kRows));
      dw_simple_kernel<T, kRows, kNV><<<grid_of(static_cast<int64_t>(ltiles) * G), kWarps * 32, 0, stream>>>(
          cptr<T>(in.h), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(), cptr<T>(in.W), cptr<T>(dO),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), ws.mutable_data_ptr<float>(), G, B, N, D, L,
          ltiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int ntiles = static_cast<int>(ceil_div(N, kWarps * kRows));
      dh_simple_kernel<T, kRows, kNV><<<grid_of(static_cast<int64_t>(ntiles) * B), kWarps * 32, 0, stream>>>(
          cptr<T>(in.h), idx.const_data_ptr<int>(), cnt.const_data_ptr<int>(), cptr<T>(in.W), cptr<T>(dO),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), mptr<T>(grad_h), N, D, L, ntiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Fixed-order sum over the batch groups, then W's dtype.
  at::Tensor grad_W = (G == 1 ? ws.select(0, 0) : ws.sum(0)).to(W_.scalar_type());
  return {grad_h, grad_W};
}

}  // namespace xmcnas_fast::cuda
