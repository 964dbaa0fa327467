// Label-wise attention through the device's matrix-product library (cuBLAS on
// CUDA, the CPU BLAS otherwise), a block of labels at a time. What CUDA runs
// for float32, where cuBLAS in IEEE float32 outruns any SIMT kernel of ours;
// for float16 / bfloat16 the rival of the fused tensor-core kernels
// (cuda/label_attention_mma.cu), which benchmarks/bench_cuda.py times beside
// them. The same contract as label_attention / label_attention_backward
// (csrc/ops.cpp): the callers check the inputs (csrc/checks.h). Built for every
// device, so that the CPU tests hold it to the reference; the private operators
// _label_attention_gemm(_backward) expose it for that.
//
// Precision: float32 products are IEEE float32, never TF32, whatever PyTorch
// allows for matrix products (TF32 would move scores near 5000 by about 2;
// bfloat16 autocast is the fast path on a GPU). The products accumulate in
// float32 (float64 for float64), and the scores, their softmax and its
// gradient stay in float32. What the
// products read is in the inputs' dtype: for 16-bit inputs the probabilities
// and the score gradients are rounded to it once, as in FlashAttention's
// backward; grad_h and grad_v are summed over the blocks in float32.
//
// Memory: one block's scores [B, N, Lb] and, in backward, their gradient, with
// Lb chosen so that each holds at most kGemmBlockElements numbers; the
// probabilities are recomputed in backward from the saved log-sum-exp, never
// stored.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace xmcnas_fast::gemm {

constexpr int64_t kGemmBlockElements = int64_t{1} << 24;

// Labels per block for a batch of B rows of N tokens (at least 1).
int64_t labels_per_block(int64_t B, int64_t N, int64_t L);

// `block`: labels per block, or 0 for labels_per_block's.
std::tuple<at::Tensor, at::Tensor> label_attention_gemm(const at::Tensor& h, const at::Tensor& mask,
                                                        const at::Tensor& W, const std::optional<at::Tensor>& v,
                                                        int64_t block = 0);

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_gemm_backward(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse, int64_t block = 0);

}  // namespace xmcnas_fast::gemm

#ifdef XMCNAS_WITH_CUDA
// The steps between the products, as CUDA kernels (cuda/label_attention_gemm.cu): one read of the
// scores where ATen's softmax, masking and casts would take several. s: one block's scores [B, N, n],
// float32 or float64, contiguous; mask [B, N] bool, contiguous.
namespace xmcnas_fast::cuda {

// The softmax of each (row, label) over the row's real tokens: P [B, N, n] in `out` (0 on padding; s
// itself when `out` is its dtype), and the log-sum-exp into lse_out, a [B, n] float32 view with unit
// stride along labels (+inf for a row without a real token).
at::Tensor gemm_block_softmax(const at::Tensor& s, const at::Tensor& mask, at::ScalarType out,
                              const at::Tensor& lse_out);

// P = exp(s - lse) (0 on padding) and dS = P (dp - delta), both in `out` (in place over s and dp when
// `out` is their dtype). dp [B, N, n] in s's dtype; lse: [B, n] float32 view as above; delta [B, n] in
// s's dtype, contiguous.
std::tuple<at::Tensor, at::Tensor> gemm_block_softmax_backward(const at::Tensor& s, const at::Tensor& dp,
                                                               const at::Tensor& mask, const at::Tensor& lse,
                                                               const at::Tensor& delta, at::ScalarType out);

}  // namespace xmcnas_fast::cuda
#endif
