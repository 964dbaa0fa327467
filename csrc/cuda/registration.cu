// Registers the CUDA kernels of every xmcnas_fast operator.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ops.cuh"

namespace xmcnas_fast::cuda {
namespace {

// label_attention with separate values v has no CUDA kernel yet: the schema's
// v must be None here, and the backward's grad_v is then empty.
void check_no_values(const std::optional<at::Tensor>& v) {
  TORCH_CHECK_NOT_IMPLEMENTED(!v.has_value(), "label_attention: separate values are not implemented on CUDA yet");
}

std::tuple<at::Tensor, at::Tensor> label_attention_entry(const at::Tensor& h, const at::Tensor& mask,
                                                         const at::Tensor& W, const std::optional<at::Tensor>& v) {
  check_no_values(v);
  return label_attention_cuda(h, mask, W);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_attention_backward_entry(
    const at::Tensor& grad_ctx, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
    const std::optional<at::Tensor>& v, const at::Tensor& ctx, const at::Tensor& lse) {
  check_no_values(v);
  auto [grad_h, grad_W] = label_attention_backward_cuda(grad_ctx, h, mask, W, ctx, lse);
  return {grad_h, grad_W, h.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CUDA, m) {
  m.impl("label_attention", &label_attention_entry);
  m.impl("label_attention_backward", &label_attention_backward_entry);
  m.impl("topk_metrics", &topk_metrics_cuda);
  m.impl("layer_sum", &layer_sum_cuda);
  m.impl("layer_sum_backward", &layer_sum_backward_cuda);
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_backward", &dropout_backward_cuda);
}

}  // namespace xmcnas_fast::cuda
