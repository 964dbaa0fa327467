// Label-wise attention through the device's matrix-product library (cuBLAS on
// CUDA, the CPU BLAS otherwise), a block of labels at a time: what CUDA runs for
// float32, where cuBLAS (TF32 tensor cores when PyTorch allows TF32 for matrix
// products, exact float32 otherwise) outruns any SIMT kernel of ours. The same
// contract as label_attention / label_attention_backward (csrc/ops.cpp): the
// callers check the inputs (csrc/checks.h). Built for every device, so that the
// CPU tests hold it to the reference; the private operators
// _label_attention_gemm(_backward) expose it for that.
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
