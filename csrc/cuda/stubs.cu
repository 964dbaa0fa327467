// CUDA registrations: kernels are not written yet. Calling an op on a CUDA
// tensor says so instead of failing with a missing-kernel dispatch error.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace xmcnas_fast {
namespace {

[[noreturn]] void not_yet(const char* op) {
  TORCH_CHECK(false, "xmcnas_fast::", op, " is not implemented on CUDA yet");
}

std::tuple<at::Tensor, at::Tensor> label_attention_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  not_yet("label_attention");
}
std::tuple<at::Tensor, at::Tensor> label_attention_backward_cuda(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&) {
  not_yet("label_attention_backward");
}
std::tuple<at::Tensor, at::Tensor> topk_metrics_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     int64_t, const std::optional<at::Tensor>&) {
  not_yet("topk_metrics");
}
at::Tensor layer_sum_cuda(at::TensorList, const at::Tensor&) { not_yet("layer_sum"); }
std::tuple<std::vector<at::Tensor>, at::Tensor> layer_sum_backward_cuda(const at::Tensor&, at::TensorList,
                                                                        const at::Tensor&) {
  not_yet("layer_sum_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(xmcnas_fast, CUDA, m) {
  m.impl("label_attention", &label_attention_cuda);
  m.impl("label_attention_backward", &label_attention_backward_cuda);
  m.impl("topk_metrics", &topk_metrics_cuda);
  m.impl("layer_sum", &layer_sum_cuda);
  m.impl("layer_sum_backward", &layer_sum_backward_cuda);
}

}  // namespace xmcnas_fast
