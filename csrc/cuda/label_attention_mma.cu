// Tensor-core kernels of label-wise attention (float16 / bfloat16 inputs,
// float32 accumulation), flash-attention style: the [B, L, N] scores are never
// written to global memory.
//
// Layout of a block: warps form a grid of wm row groups x wd column slices.
// A warp owns 16 rows (labels; tokens in the grad_h pass) and the 128 columns
// [128 * wd_i, 128 * wd_i + 128) of D. A score tile (16 rows x 32 tokens) needs
// the whole of D, so each warp computes the partial product over its slice
// with mma.sync m16n8k16 and the wd partials are summed through shared memory
// (in the accumulator's native register layout, in a fixed order, so that the
// wd warps of a row group see bit-identical scores and run the same online
// softmax). The product with the values then stays within the warp's slice,
// so accumulators are 16 x 128 float32 per warp (64 registers a thread) for
// any D up to 1024.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs): g = lane / 4,
// t = lane % 4. A (16x16, row-major): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..),
// reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..). B (16x8, "col"): reg0 = rows
// (2t, 2t+1) of column g, reg1 = rows (2t+8, 2t+9). C/D (16x8 float):
// c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1). Two adjacent C tiles of a
// score row block are therefore one A fragment of the next product (the
// "register reuse" of flash-attention 2): no shared-memory round trip for P.
#include "label_attention.cuh"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace xmcnas_fast::cuda::la {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreadsMax = 256;

// ---------------------------------------------------------------------------
// PTX wrappers (sm_80+; the host never launches these kernels on older GPUs).
// ---------------------------------------------------------------------------

[[maybe_unused]] __device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                              const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
#endif
}

// Two floats as the two 16-bit halves of a register (lo = the lower column).
template <typename T>
__device__ __forceinline__ unsigned pack(float lo, float hi) {
  unsigned u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&u, &v, 4);
  }
  return u;
}

#define XMCNAS_MMA_16816(TY)                                                                                     \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                                               \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                          \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// c += A (16x16) . B (16x8), float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    XMCNAS_MMA_16816("bf16");
  } else {
    XMCNAS_MMA_16816("f16");
  }
#else
  __trap();  // compiled for an older GPU: mma_eligible keeps the host from launching this
#endif
}
#undef XMCNAS_MMA_16816

// ---------------------------------------------------------------------------
// Building blocks.
// ---------------------------------------------------------------------------

// Two consecutive 16-bit elements of a row as one register (0 past D or for a
// missing row). col is even and D a multiple of 8, so the pair is all in or out.
template <typename T>
__device__ __forceinline__ unsigned ld_pair(const T* row, int col, int D) {
  return (row != nullptr && col < D) ? *reinterpret_cast<const unsigned*>(row + col) : 0u;
}

// A fragments of the 16 x 128 block [rows r0 (g) / r1 (g + 8)] x [c0, c0 + 128).
template <typename T>
__device__ __forceinline__ void load_a(unsigned (&a)[8][4], const T* r0, const T* r1, int c0, int D, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int col = c0 + 16 * kk + 2 * t;
    a[kk][0] = ld_pair(r0, col, D);
    a[kk][1] = ld_pair(r1, col, D);
    a[kk][2] = ld_pair(r0, col + 8, D);
    a[kk][3] = ld_pair(r1, col + 8, D);
  }
}

// acc[j] += A (16 x 128, fragments) . rows[8j .. 8j+8)^T over the 128 columns
// starting at `rows` (shared memory, row stride srow elements), j < 4.
template <typename T>
__device__ __forceinline__ void mma_scores(float (&acc)[4][4], const unsigned (&a)[8][4], const T* rows, int srow,
                                           int lane) {
#pragma unroll
  for (int kk = 0; kk < 8; kk += 2) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned b0, b1, b2, b3;
      ldsm_x4(b0, b1, b2, b3, rows + (8 * j + (lane & 7)) * srow + 16 * kk + 8 * (lane >> 3));
      mma<T>(acc[j], a[kk], b0, b1);
      mma<T>(acc[j], a[kk + 1], b2, b3);
    }
  }
}

// o[n] += P (16 x 32, two A fragments) . rows[0 .. 32) over the 128 columns
// starting at `rows` (16 output tiles of 8 columns).
template <typename T>
__device__ __forceinline__ void mma_values(float (&o)[16][4], const unsigned (&p)[2][4], const T* rows, int srow,
                                           int lane) {
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
    for (int n2 = 0; n2 < 8; ++n2) {
      unsigned b0, b1, b2, b3;
      ldsm_x4_trans(b0, b1, b2, b3,
                    rows + (16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1)) * srow + 16 * n2 + 8 * (lane >> 4));
      mma<T>(o[2 * n2], p[ks], b0, b1);
      mma<T>(o[2 * n2 + 1], p[ks], b2, b3);
    }
  }
}

// Score tile (4 C tiles) -> the two A fragments of the next product.
template <typename T>
__device__ __forceinline__ void to_a(unsigned (&p)[2][4], const float (&s)[4][4]) {
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    p[ks][0] = pack<T>(s[2 * ks][0], s[2 * ks][1]);
    p[ks][1] = pack<T>(s[2 * ks][2], s[2 * ks][3]);
    p[ks][2] = pack<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
    p[ks][3] = pack<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
  }
}

// Cross-warp sum of partial score tiles. Each warp publishes its 4 C tiles
// to its own slots of `red` (float4 [wm][wd][slots][32], lane-contiguous:
// free of bank conflicts both ways); after the caller's __syncthreads, a warp
// sums the partials of the wd warps of its row group, in the order 0, 1, ...,
// so that all of them hold bit-identical scores.
__device__ __forceinline__ void publish(float4* dst, const float (&acc)[4][4], int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) dst[j * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
}
__device__ __forceinline__ void gather(float (&s)[4][4], const float4* src, int warp_stride, int wd, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  for (int w = 0; w < wd; ++w) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4 v = src[w * warp_stride + j * 32 + lane];
      s[j][0] += v.x;
      s[j][1] += v.y;
      s[j][2] += v.z;
      s[j][3] += v.w;
    }
  }
}

__device__ __forceinline__ void zero(float (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = 0.f;
}

// Two 16 x 32 score tiles, s = A1 . rows1^T over D and u = A2 . rows2^T over
// Dv (row strides srow1, srow2): each warp's partial over its slice (zero
// where the slice lies past that width: has1 / has2 false), summed over the
// wd warps of its row group through red (8 slots a warp). Synchronises the block.
template <typename T>
__device__ __forceinline__ void score_pair(float (&s)[4][4], float (&u)[4][4], const unsigned (&a1)[8][4],
                                           const T* rows1, int srow1, bool has1, const unsigned (&a2)[8][4],
                                           const T* rows2, int srow2, bool has2, float4* my_red,
                                           const float4* group_red, int wd, int lane) {
  float ps[4][4], pu[4][4];
  zero(ps);
  zero(pu);
  if (has1) mma_scores<T>(ps, a1, rows1, srow1, lane);
  if (has2) mma_scores<T>(pu, a2, rows2, srow2, lane);
  publish(my_red, ps, lane);
  publish(my_red + 4 * 32, pu, lane);
  __syncthreads();
  gather(s, group_red, 8 * 32, wd, lane);
  gather(u, group_red + 4 * 32, 8 * 32, wd, lane);
}

// The padded width of a staged row of D elements: D rounded up to the warp
// slice (the columns past D are zeros), and its shared-memory row stride (8
// more: the rows of an ldmatrix fall in different banks).
__device__ __forceinline__ int padded(int D) { return static_cast<int>(ceil_div(D, kSlice)) * kSlice; }
__device__ __forceinline__ int row_stride(int D) { return padded(D) + 8; }

// Stages kChunk rows of D elements into shared memory (row stride srow, the
// columns [D, dp) zero-filled). Row j comes from src_row(j), or is all zero
// when that is nullptr.
template <typename T, typename RowFn>
__device__ __forceinline__ void stage_rows(T* dst, const T* any_global, int D, int dp, int srow, RowFn src_row) {
  const int per_row = dp / 8;
  const int total = kChunk * per_row;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int j = e / per_row;
    const int col = (e - j * per_row) * 8;
    const T* row = src_row(j);
    const bool ok = row != nullptr && col < D;
    cp_async16(dst + j * srow + col, ok ? row + col : any_global /* not read */, ok);
  }
}

template <typename T>
struct TokenRows {  // the real tokens pos0 .. pos0 + kChunk of one batch item
  const T* hb;
  const int* ib;
  int pos0, nreal, D;
  __device__ const T* operator()(int j) const {
    const int pos = pos0 + j;
    return pos < nreal ? hb + static_cast<int64_t>(ib[pos]) * D : nullptr;
  }
};

template <typename T>
struct LabelRows {  // rows l0 .. l0 + kChunk of an [L, D] matrix
  const T* base;
  int l0, L, D;
  __device__ const T* operator()(int j) const {
    const int l = l0 + j;
    return l < L ? base + static_cast<int64_t>(l) * D : nullptr;
  }
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

__device__ __forceinline__ void store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  *reinterpret_cast<unsigned*>(p) = pack<T>(a, b);
}

// Stores a warp's 16 x 128 float tile, rows scaled by s0 / s1, into rows r0
// (g) and r1 (g + 8) (nullptr: not stored) from column c0, as pairs of Out.
template <typename Out>
__device__ __forceinline__ void store_tile(Out* r0, Out* r1, const float (&o)[16][4], float s0, float s1, int c0,
                                           int D, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int n = 0; n < 16; ++n) {
    const int col = c0 + 8 * n + 2 * t;
    if (col < D) {
      if (r0 != nullptr) store_pair(r0 + col, o[n][0] * s0, o[n][1] * s0);
      if (r1 != nullptr) store_pair(r1 + col, o[n][2] * s1, o[n][3] * s1);
    }
  }
}

template <typename T>
__device__ __forceinline__ T* row_ptr(T* base, int64_t row, int64_t rows, int D) {
  return row < rows ? base + row * D : nullptr;
}

__device__ __forceinline__ void zero(float (&o)[16][4]) {
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
}

// Where a warp sits: row group wm_i and D slice wd_i of its block; blocks
// are numbered outer * tiles + tile; the lane's two rows are row0 (g) and
// row1 (g + 8) of the grid-wide row space (labels, or real-token positions).
struct WarpPlace {
  int lane, t, wm_i, wd_i, c0, outer, row0, row1;
};

__device__ __forceinline__ WarpPlace warp_place(int wd, int wm, int tiles) {
  WarpPlace w;
  const int warp = threadIdx.x >> 5;
  w.lane = threadIdx.x & 31;
  w.t = w.lane & 3;
  w.wm_i = warp / wd;
  w.wd_i = warp - w.wm_i * wd;
  w.c0 = w.wd_i * kSlice;
  w.outer = blockIdx.x / tiles;
  w.row0 = (blockIdx.x - w.outer * tiles) * 16 * wm + 16 * w.wm_i + (w.lane >> 2);
  w.row1 = w.row0 + 8;
  return w;
}

// Calls body(h_tile, v_tile, valid) for the real tokens of one batch item,
// kChunk at a time staged in kh (rows of D, stride row_stride(D)) and, with
// separate values (kV), kv (rows of Dv, stride row_stride(Dv)); without
// them v_tile is h_tile. Two buffers each: the next chunk loads while body
// runs on the current one; tile rows valid .. kChunk-1 are zeros. Every
// thread of the block must call it (it synchronises the block around body).
template <typename T, bool kV, typename Body>
__device__ __forceinline__ void for_token_chunks(T* kh, T* kv, const T* h, const T* hb, const T* vb, const int* ib,
                                                 int nreal, int D, int Dv, Body&& body) {
  const int nchunks = static_cast<int>(ceil_div(nreal, kChunk));
  if (nchunks == 0) return;
  const int srow_h = row_stride(D), srow_v = row_stride(Dv);
  auto stage = [&](int c) {
    const int buf = c & 1;
    stage_rows(kh + buf * kChunk * srow_h, h, D, padded(D), srow_h, TokenRows<T>{hb, ib, c * kChunk, nreal, D});
    if constexpr (kV) {
      stage_rows(kv + buf * kChunk * srow_v, h, Dv, padded(Dv), srow_v, TokenRows<T>{vb, ib, c * kChunk, nreal, Dv});
    }
    cp_async_commit();
  };
  stage(0);
  for (int c = 0; c < nchunks; ++c) {
    if (c + 1 < nchunks) {
      stage(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ht = kh + (c & 1) * kChunk * srow_h;
    body(ht, kV ? kv + (c & 1) * kChunk * srow_v : ht, nreal - c * kChunk);
    __syncthreads();  // the buffer is refilled by the next iteration
  }
}

// ---------------------------------------------------------------------------
// Forward. Block: 16 * wm labels of one batch item; loop over its real tokens
// in chunks of 32, online softmax. The values are v (kV) or h. A warp's
// slice [c0, c0 + 128) takes part in the scores where c0 < D and in the
// values where c0 < Dv.
// ---------------------------------------------------------------------------

template <typename T, bool kV>
__global__ void __launch_bounds__(kThreadsMax)
    la_fwd_mma_kernel(const T* __restrict__ h, const T* __restrict__ v, const int* __restrict__ idx,
                      const int* __restrict__ cnt, const T* __restrict__ W, T* __restrict__ ctx,
                      float* __restrict__ lse, int N, int D, int Dv, int L, int wd, int wm, int tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int srow_h = row_stride(D), srow_v = row_stride(Dv);
  T* kh = reinterpret_cast<T*>(smem);                    // [2][kChunk][srow_h]
  T* kv = kh + 2 * kChunk * srow_h;                      // [2][kChunk][srow_v], with kV
  float4* red = reinterpret_cast<float4*>(kv + (kV ? 2 * kChunk * srow_v : 0));  // [wm][wd][4][32]
  const WarpPlace w = warp_place(wd, wm, tiles);
  const int b = w.outer, t = w.t, lane = w.lane;
  const bool in_h = w.c0 < D, in_v = w.c0 < Dv;

  unsigned qa[8][4];
  load_a(qa, row_ptr(W, w.row0, L, D), row_ptr(W, w.row1, L, D), w.c0, D, lane);
  float o[16][4];
  zero(o);
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // l: per-lane partial row sums
  float4* my_red = red + (w.wm_i * wd + w.wd_i) * 4 * 32;
  const float4* group_red = red + w.wm_i * wd * 4 * 32;
  const T* vb = kV ? v + static_cast<int64_t>(b) * N * Dv : nullptr;

  for_token_chunks<T, kV>(kh, kv, h, h + static_cast<int64_t>(b) * N * D, vb, idx + static_cast<int64_t>(b) * N,
                          cnt[b], D, Dv, [&](const T* hb_s, const T* vb_s, int valid) {
    float sp[4][4];
    zero(sp);
    if (in_h) mma_scores<T>(sp, qa, hb_s + w.c0, srow_h, lane);
    publish(my_red, sp, lane);
    __syncthreads();
    float s[4][4];
    gather(s, group_red, 4 * 32, wd, lane);

    // Online softmax; tokens valid .. 31 of the chunk are not real.
    float cm0 = -INFINITY, cm1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (8 * j + 2 * t + (e & 1) >= valid) s[j][e] = -INFINITY;
      }
      cm0 = fmaxf(cm0, fmaxf(s[j][0], s[j][1]));
      cm1 = fmaxf(cm1, fmaxf(s[j][2], s[j][3]));
    }
    const float mn0 = fmaxf(m0, quad_max(cm0)), mn1 = fmaxf(m1, quad_max(cm1));  // finite: valid >= 1
    const float a0 = exp2f((m0 - mn0) * kLog2e), a1 = exp2f((m1 - mn1) * kLog2e);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[j][0] = exp2f((s[j][0] - mn0) * kLog2e);
      s[j][1] = exp2f((s[j][1] - mn0) * kLog2e);
      s[j][2] = exp2f((s[j][2] - mn1) * kLog2e);
      s[j][3] = exp2f((s[j][3] - mn1) * kLog2e);
      ps0 += s[j][0] + s[j][1];
      ps1 += s[j][2] + s[j][3];
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[n][0] *= a0;
      o[n][1] *= a0;
      o[n][2] *= a1;
      o[n][3] *= a1;
    }
    unsigned pa[2][4];
    to_a<T>(pa, s);
    if (in_v) mma_values<T>(o, pa, vb_s + w.c0, srow_v, lane);
  });

  const float sum0 = quad_sum(l0), sum1 = quad_sum(l1);
  const int64_t base = static_cast<int64_t>(b) * L;
  store_tile(row_ptr(ctx + base * Dv, w.row0, L, Dv), row_ptr(ctx + base * Dv, w.row1, L, Dv), o,
             sum0 > 0.f ? 1.f / sum0 : 0.f, sum1 > 0.f ? 1.f / sum1 : 0.f, w.c0, Dv, lane);
  if (w.wd_i == 0 && t == 0) {
    if (w.row0 < L) lse[base + w.row0] = sum0 > 0.f ? m0 + logf(sum0) : INFINITY;
    if (w.row1 < L) lse[base + w.row1] = sum1 > 0.f ? m1 + logf(sum1) : INFINITY;
  }
}

// ---------------------------------------------------------------------------
// Backward, grad_W pass. Block: 16 * wm labels, batch items g, g + G, ...;
// recomputes S = W h^T and dP = dO u^T (u: the values) tile by tile and
// accumulates grad_W += dS h in registers (no atomics).
// ---------------------------------------------------------------------------

template <typename T, bool kV>
__global__ void __launch_bounds__(kThreadsMax)
    la_dw_mma_kernel(const T* __restrict__ h, const T* __restrict__ v, const int* __restrict__ idx,
                     const int* __restrict__ cnt, const T* __restrict__ W, const T* __restrict__ dO,
                     const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ ws, int G,
                     int B, int N, int D, int Dv, int L, int wd, int wm, int tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int srow_h = row_stride(D), srow_v = row_stride(Dv);
  T* kh = reinterpret_cast<T*>(smem);  // [2][kChunk][srow_h]
  T* kv = kh + 2 * kChunk * srow_h;    // [2][kChunk][srow_v], with kV
  float4* red = reinterpret_cast<float4*>(kv + (kV ? 2 * kChunk * srow_v : 0));  // [wm][wd][8][32]
  const WarpPlace w = warp_place(wd, wm, tiles);
  const int t = w.t, lane = w.lane;
  const bool in_h = w.c0 < D, in_v = w.c0 < Dv;

  unsigned qa[8][4];
  load_a(qa, row_ptr(W, w.row0, L, D), row_ptr(W, w.row1, L, D), w.c0, D, lane);
  float acc[16][4];
  zero(acc);
  float4* my_red = red + (w.wm_i * wd + w.wd_i) * 8 * 32;
  const float4* group_red = red + w.wm_i * wd * 8 * 32;

  for (int b = w.outer; b < B; b += G) {
    const int64_t base = static_cast<int64_t>(b) * L;
    unsigned da[8][4];
    load_a(da, row_ptr(dO + base * Dv, w.row0, L, Dv), row_ptr(dO + base * Dv, w.row1, L, Dv), w.c0, Dv, lane);
    const float lse0 = w.row0 < L ? lse[base + w.row0] : INFINITY, lse1 = w.row1 < L ? lse[base + w.row1] : INFINITY;
    const float dl0 = w.row0 < L ? delta[base + w.row0] : 0.f, dl1 = w.row1 < L ? delta[base + w.row1] : 0.f;
    const T* vb = kV ? v + static_cast<int64_t>(b) * N * Dv : nullptr;

    for_token_chunks<T, kV>(kh, kv, h, h + static_cast<int64_t>(b) * N * D, vb, idx + static_cast<int64_t>(b) * N,
                            cnt[b], D, Dv, [&](const T* hb_s, const T* vb_s, int valid) {
      float s[4][4], dpv[4][4];  // W.h and dO.u
      score_pair<T>(s, dpv, qa, hb_s + w.c0, srow_h, in_h, da, vb_s + w.c0, srow_v, in_v, my_red, group_red, wd,
                    lane);

      float ds[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = 8 * j + 2 * t + (e & 1) < valid;
          const float p = ok ? exp2f((s[j][e] - (e < 2 ? lse0 : lse1)) * kLog2e) : 0.f;
          ds[j][e] = p * (dpv[j][e] - (e < 2 ? dl0 : dl1));
        }
      }
      unsigned dsa[2][4];
      to_a<T>(dsa, ds);
      if (in_h) mma_values<T>(acc, dsa, hb_s + w.c0, srow_h, lane);
    });
  }

  float* out = ws + static_cast<int64_t>(w.outer) * L * D;
  store_tile(row_ptr(out, w.row0, L, D), row_ptr(out, w.row1, L, D), acc, 1.f, 1.f, w.c0, D, lane);
}

// ---------------------------------------------------------------------------
// Backward, token passes. Block: 16 * wm real tokens of one batch item; loop
// over the labels in chunks of 32: S^T = h W^T (and dP^T = u dO^T), then
//   kAlias  (values h): grad_h += P^T dO + dS^T W
//   kGradH  (values v): grad_h += dS^T W
//   kGradV  (values v): grad_v += P^T dO
// Recomputing S here instead of adding into grad_h from the grad_W pass with
// atomics keeps the result deterministic and avoids L / 16 blocks contending
// for the same rows of a float32 copy of grad_h.
// ---------------------------------------------------------------------------

enum TokenPass { kAlias, kGradH, kGradV };

template <typename T, int kPass>
__global__ void __launch_bounds__(kThreadsMax)
    la_dh_mma_kernel(const T* __restrict__ h, const T* __restrict__ v, const int* __restrict__ idx,
                     const int* __restrict__ cnt, const T* __restrict__ W, const T* __restrict__ dO,
                     const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ out, int N,
                     int D, int Dv, int L, int wd, int wm, int tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int srow_h = row_stride(D), srow_v = row_stride(Dv);
  T* wbuf = reinterpret_cast<T*>(smem);  // [kChunk][srow_h]
  T* obuf = wbuf + kChunk * srow_h;      // [kChunk][srow_v]
  float* lse_s = reinterpret_cast<float*>(obuf + kChunk * srow_v);
  float* del_s = lse_s + kChunk;
  float4* red = reinterpret_cast<float4*>(del_s + kChunk);  // [wm][wd][8][32]

  const WarpPlace w = warp_place(wd, wm, tiles);  // rows: positions in the list of real tokens
  const int b = w.outer, t = w.t, lane = w.lane;
  const bool in_h = w.c0 < D, in_v = w.c0 < Dv;
  const int nreal = cnt[b];
  if ((blockIdx.x - b * tiles) * 16 * wm >= nreal) return;  // uniform over the block, before any barrier

  const int* ib = idx + static_cast<int64_t>(b) * N;
  const T* hb = h + static_cast<int64_t>(b) * N * D;
  const int64_t tok0 = w.row0 < nreal ? ib[w.row0] : -1, tok1 = w.row1 < nreal ? ib[w.row1] : -1;

  unsigned ha[8][4], va[8][4];
  load_a(ha, tok0 >= 0 ? hb + tok0 * D : nullptr, tok1 >= 0 ? hb + tok1 * D : nullptr, w.c0, D, lane);
  if constexpr (kPass == kGradH) {
    const T* vb = v + static_cast<int64_t>(b) * N * Dv;
    load_a(va, tok0 >= 0 ? vb + tok0 * Dv : nullptr, tok1 >= 0 ? vb + tok1 * Dv : nullptr, w.c0, Dv, lane);
  }
  float acc[16][4];
  zero(acc);
  float4* my_red = red + (w.wm_i * wd + w.wd_i) * 8 * 32;
  const float4* group_red = red + w.wm_i * wd * 8 * 32;
  const int64_t base = static_cast<int64_t>(b) * L;
  const T* dOb = dO + base * Dv;

  for (int l0 = 0; l0 < L; l0 += kChunk) {
    stage_rows(wbuf, W, D, padded(D), srow_h, LabelRows<T>{W, l0, L, D});
    stage_rows(obuf, W, Dv, padded(Dv), srow_v, LabelRows<T>{dOb, l0, L, Dv});
    cp_async_commit();
    if (threadIdx.x < kChunk) {
      const int l = l0 + threadIdx.x;
      lse_s[threadIdx.x] = l < L ? lse[base + l] : INFINITY;  // P = 0 past L
      if constexpr (kPass != kGradV) del_s[threadIdx.x] = l < L ? delta[base + l] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    float s[4][4], dpv[4][4];  // h.W and u.dO (dpv unused by kGradV)
    if constexpr (kPass == kGradV) {
      float ps[4][4];
      zero(ps);
      if (in_h) mma_scores<T>(ps, ha, wbuf + w.c0, srow_h, lane);
      publish(my_red, ps, lane);
      __syncthreads();
      gather(s, group_red, 8 * 32, wd, lane);
    } else if constexpr (kPass == kGradH) {
      score_pair<T>(s, dpv, ha, wbuf + w.c0, srow_h, in_h, va, obuf + w.c0, srow_v, in_v, my_red, group_red, wd,
                    lane);
    } else {
      score_pair<T>(s, dpv, ha, wbuf + w.c0, srow_h, in_h, ha, obuf + w.c0, srow_v, in_h, my_red, group_red, wd,
                    lane);
    }

    float p[4][4], ds[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1);
        p[j][e] = exp2f((s[j][e] - lse_s[col]) * kLog2e);
        if constexpr (kPass != kGradV) ds[j][e] = p[j][e] * (dpv[j][e] - del_s[col]);
      }
    }
    if constexpr (kPass != kGradH) {  // P^T dO: into grad_h (kAlias) or grad_v (kGradV)
      unsigned pa[2][4];
      to_a<T>(pa, p);
      if (in_v) mma_values<T>(acc, pa, obuf + w.c0, srow_v, lane);
    }
    if constexpr (kPass != kGradV) {  // dS^T W
      unsigned dsa[2][4];
      to_a<T>(dsa, ds);
      if (in_h) mma_values<T>(acc, dsa, wbuf + w.c0, srow_h, lane);
    }
    __syncthreads();  // the buffers are refilled by the next iteration
  }

  const int width = kPass == kGradV ? Dv : D;
  T* ob = out + static_cast<int64_t>(b) * N * width;
  store_tile(tok0 >= 0 ? ob + tok0 * width : nullptr, tok1 >= 0 ? ob + tok1 * width : nullptr, acc, 1.f, 1.f, w.c0,
             width, lane);
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

// Shared memory of each pass: staged tiles of kChunk rows (h / W of width D,
// values / grad_ctx of width Dv), then the cross-warp reduction slots.
size_t tile_bytes(int64_t width) { return static_cast<size_t>(kChunk) * (ceil_div(width, kSlice) * kSlice + 8) * 2; }
size_t red_bytes(const MmaLayout& ly, int slots) {
  return static_cast<size_t>(ly.wm) * ly.wd * slots * 32 * sizeof(float4);
}
size_t fwd_smem(const MmaLayout& ly, int64_t D, int64_t Dv, bool values) {
  return 2 * tile_bytes(D) + (values ? 2 * tile_bytes(Dv) : 0) + red_bytes(ly, 4);
}
size_t dw_smem(const MmaLayout& ly, int64_t D, int64_t Dv, bool values) {
  return 2 * tile_bytes(D) + (values ? 2 * tile_bytes(Dv) : 0) + red_bytes(ly, 8);
}
size_t dh_smem(const MmaLayout& ly, int64_t D, int64_t Dv) {
  return tile_bytes(D) + tile_bytes(Dv) + 2 * kChunk * sizeof(float) + red_bytes(ly, 8);
}

// One block per (outer, tile), outer_count * tiles blocks of 32 * wm * wd threads.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, const MmaLayout& ly, int64_t tiles, int64_t outer_count, size_t smem, cudaStream_t stream,
            Args... args) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(tiles * outer_count), 32 * ly.wm * ly.wd, smem, stream>>>(
      args..., ly.wd, ly.wm, static_cast<int>(tiles));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Fn>
void dispatch_16bit(at::ScalarType st, Fn&& fn) {
  if (st == at::kHalf) {
    fn(TypeTag<__half>{});
  } else {
    TORCH_INTERNAL_ASSERT(st == at::kBFloat16);
    fn(TypeTag<__nv_bfloat16>{});
  }
}

}  // namespace

bool mma_eligible(at::ScalarType st, int64_t D, int64_t Dv, bool values, int device) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  for (const int64_t width : {D, Dv}) {
    if (width < 8 || width > 8 * kSlice || width % 8 != 0) return false;
  }
  if (device_attr(cudaDevAttrComputeCapabilityMajor, device) < 8) return false;
  // The code the device would run must itself be sm_80+ (a "7.5+PTX" build
  // JIT-compiled for a newer GPU would not be).
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, la_fwd_mma_kernel<__nv_bfloat16, false>));
  if (attr.binaryVersion < 80 || attr.ptxVersion < 80) return false;
  const MmaLayout ly = mma_layout(D, Dv);
  const size_t need = std::max({fwd_smem(ly, D, Dv, values), dw_smem(ly, D, Dv, values), dh_smem(ly, D, Dv)});
  return need <= static_cast<size_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
}

int mma_dw_rows_per_block(int64_t D, int64_t Dv) { return 16 * mma_layout(D, Dv).wm; }

void mma_forward(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                 void* ctx, float* lse, int B, int N, int D, int Dv, int L, cudaStream_t stream) {
  const MmaLayout ly = mma_layout(D, Dv);
  dispatch_16bit(st, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(v ? la_fwd_mma_kernel<T, true> : la_fwd_mma_kernel<T, false>, ly, ceil_div(L, 16 * ly.wm), B,
           fwd_smem(ly, D, Dv, v != nullptr), stream, static_cast<const T*>(h), static_cast<const T*>(v), idx, cnt,
           static_cast<const T*>(W), static_cast<T*>(ctx), lse, N, D, Dv, L);
  });
}

void mma_backward_dw(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                     const void* dO, const float* lse, const float* delta, float* ws, int G, int B, int N, int D,
                     int Dv, int L, cudaStream_t stream) {
  const MmaLayout ly = mma_layout(D, Dv);
  dispatch_16bit(st, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(v ? la_dw_mma_kernel<T, true> : la_dw_mma_kernel<T, false>, ly, ceil_div(L, 16 * ly.wm), G,
           dw_smem(ly, D, Dv, v != nullptr), stream, static_cast<const T*>(h), static_cast<const T*>(v), idx, cnt,
           static_cast<const T*>(W), static_cast<const T*>(dO), lse, delta, ws, G, B, N, D, Dv, L);
  });
}

void mma_backward_dh(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                     const void* dO, const float* lse, const float* delta, void* gh, int B, int N, int D, int Dv,
                     int L, cudaStream_t stream) {
  const MmaLayout ly = mma_layout(D, Dv);
  dispatch_16bit(st, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(v ? la_dh_mma_kernel<T, kGradH> : la_dh_mma_kernel<T, kAlias>, ly, ceil_div(N, 16 * ly.wm), B,
           dh_smem(ly, D, Dv), stream, static_cast<const T*>(h), static_cast<const T*>(v), idx, cnt,
           static_cast<const T*>(W), static_cast<const T*>(dO), lse, delta, static_cast<T*>(gh), N, D, Dv, L);
  });
}

void mma_backward_dv(at::ScalarType st, const void* h, const int* idx, const int* cnt, const void* W, const void* dO,
                     const float* lse, void* gv, int B, int N, int D, int Dv, int L, cudaStream_t stream) {
  const MmaLayout ly = mma_layout(D, Dv);
  dispatch_16bit(st, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(la_dh_mma_kernel<T, kGradV>, ly, ceil_div(N, 16 * ly.wm), B, dh_smem(ly, D, Dv), stream,
           static_cast<const T*>(h), static_cast<const T*>(nullptr), idx, cnt, static_cast<const T*>(W),
           static_cast<const T*>(dO), lse, static_cast<const float*>(nullptr), static_cast<T*>(gv), N, D, Dv, L);
  });
}

}  // namespace xmcnas_fast::cuda::la
