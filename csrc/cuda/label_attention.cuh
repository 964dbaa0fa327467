// Label-wise attention on CUDA: what label_attention.cu (entry points, simple
// kernels for every dtype) and label_attention_mma.cu (tensor-core kernels for
// float16 / bfloat16) share.
//
// Both files see the token mask as a compacted list: idx[b, 0..cnt[b]) holds
// the positions of the real tokens of batch item b, so padding tokens are
// never loaded nor multiplied.
#pragma once

#include "common.cuh"

namespace xmcnas_fast::cuda::la {

// The tensor-core path: each warp owns a 128-wide slice of D and 16 rows
// (labels, or tokens in the grad_h pass); scores are summed over the D slices
// through shared memory. Tiles of 32 tokens (or labels) are staged in shared
// memory with cp.async.
constexpr int kSlice = 128;
constexpr int kChunk = 32;

struct MmaLayout {
  int wd;  // warps across the wider of D and Dv (ceil(max(D, Dv) / 128))
  int wm;  // 16-row groups per block
};

inline MmaLayout mma_layout(int64_t D, int64_t Dv) {
  const int wd = static_cast<int>(ceil_div(D > Dv ? D : Dv, kSlice));
  return {wd, wd <= 2 ? 4 : (wd <= 4 ? 2 : 1)};
}

// Whether the tensor-core kernels take this problem: float16/bfloat16, D and
// Dv multiples of 8 in [8, 1024], a device of compute capability >= 8.0 with
// enough shared memory per block for every pass (separate values stage a
// second tile). (Pointer alignment is the caller's check.)
bool mma_eligible(at::ScalarType st, int64_t D, int64_t Dv, bool values, int device);

// In all of these, v is the values [B, N, Dv], or nullptr for h itself (then Dv == D).

// ctx [B, L, Dv], lse <- forward. grid/batch bounds are the launcher's business.
void mma_forward(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                 void* ctx, float* lse, int B, int N, int D, int Dv, int L, cudaStream_t stream);

// Labels per block of the grad_W pass (to choose how many batch groups split it).
int mma_dw_rows_per_block(int64_t D, int64_t Dv);

// grad_W partial sums ws[g, L, D] (float32) over the batch items g, g+G, ...
void mma_backward_dw(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                     const void* dO, const float* lse, const float* delta, float* ws, int G, int B, int N, int D,
                     int Dv, int L, cudaStream_t stream);

// grad_h rows of the real tokens (padding rows are left untouched).
void mma_backward_dh(at::ScalarType st, const void* h, const void* v, const int* idx, const int* cnt, const void* W,
                     const void* dO, const float* lse, const float* delta, void* gh, int B, int N, int D, int Dv,
                     int L, cudaStream_t stream);

// grad_v rows [.., Dv] of the real tokens, with separate values only.
void mma_backward_dv(at::ScalarType st, const void* h, const int* idx, const int* cnt, const void* W, const void* dO,
                     const float* lse, void* gv, int B, int N, int D, int Dv, int L, cudaStream_t stream);

}  // namespace xmcnas_fast::cuda::la
