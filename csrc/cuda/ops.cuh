// The CUDA entry points of the xmcnas_fast operators (schemas in csrc/ops.cpp),
// defined next to their kernels and registered together in registration.cu,
// the one CUDA file that includes torch/library.h (a heavy header: the others
// stay with ATen/core/Tensor.h to keep the build fast).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace xmcnas_fast::cuda {

std::tuple<at::Tensor, at::Tensor> label_attention_cuda(const at::Tensor& h, const at::Tensor& mask,
                                                        const at::Tensor& W, const std::optional<at::Tensor>& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_backward_cuda(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor> label_attention_shortlist_cuda(const at::Tensor& h, const at::Tensor& mask,
                                                                  const at::Tensor& W, const at::Tensor& labels,
                                                                  const std::optional<at::Tensor>& v, bool sparse_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_shortlist_backward_cuda(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const at::Tensor& labels, const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor> topk_metrics_cuda(const at::Tensor& scores, const at::Tensor& indptr,
                                                     const at::Tensor& indices, int64_t k,
                                                     const std::optional<at::Tensor>& inv_prop);
at::Tensor layer_sum_cuda(at::TensorList xs, const at::Tensor& w);
std::tuple<std::vector<at::Tensor>, at::Tensor> layer_sum_backward_cuda(const at::Tensor& grad, at::TensorList xs,
                                                                        const at::Tensor& w);
at::Tensor dropout_cuda(const at::Tensor& x, double p, const at::Tensor& seed, bool relu);
at::Tensor dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& y, double p, const at::Tensor& seed,
                                 bool relu);

}  // namespace xmcnas_fast::cuda
