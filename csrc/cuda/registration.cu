// Registers the CUDA kernels of every xmcnas_fast operator.
#include <torch/library.h>

#include "ops.cuh"

namespace xmcnas_fast::cuda {

TORCH_LIBRARY_IMPL(xmcnas_fast, CUDA, m) {
  m.impl("label_attention", &label_attention_cuda);
  m.impl("label_attention_backward", &label_attention_backward_cuda);
  m.impl("label_attention_shortlist", &label_attention_shortlist_cuda);
  m.impl("label_attention_shortlist_backward", &label_attention_shortlist_backward_cuda);
  m.impl("topk_metrics", &topk_metrics_cuda);
  m.impl("layer_sum", &layer_sum_cuda);
  m.impl("layer_sum_backward", &layer_sum_backward_cuda);
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_backward", &dropout_backward_cuda);
}

}  // namespace xmcnas_fast::cuda
