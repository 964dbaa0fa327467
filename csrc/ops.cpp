// The schemas of every xmcnas_fast operator. The CPU kernels register
// themselves next to their code (csrc/cpu/*.cpp), the CUDA kernels all in
// csrc/cuda/registration.cu; the input checks that both devices share are in
// csrc/checks.h; autograd, fake (meta) implementations and the plain-PyTorch
// references live in xmcnas_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

// `import xmcnas_fast._C` loads this library, which runs the static
// registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(xmcnas_fast, m) {
  // Label-wise attention: ctx[b,l] = sum_n softmax_n(W[l].h[b,n] | mask[b,n]) v[b,n],
  // with values v [B,N,Dv] (h's padding), or h itself when v is None. h float32,
  // bfloat16, float16 or float64; W and v in h's dtype; mask bool (csrc/checks.h).
  // Returns (ctx [B,L,Dv] in h's dtype, lse [B,L] float32: log-sum-exp of the
  // scores over real tokens, +inf for a row with no real token). The backward
  // returns (grad_h, grad_W, grad_v); grad_v is empty (numel 0) when v is None.
  m.def("label_attention(Tensor h, Tensor mask, Tensor W, Tensor? v=None) -> (Tensor, Tensor)");
  m.def(
      "label_attention_backward(Tensor grad_ctx, Tensor h, Tensor mask, Tensor W, Tensor? v, "
      "Tensor ctx, Tensor lse) -> (Tensor, Tensor, Tensor)");
  // Out of training, label_attention followed by relu_dropout_dot without dropout, in one pass that
  // writes only the scores [B,L] (h's dtype): score[b,l] = sum_d w[d] relu(ctx[b,l,d]), w [Dv]
  // float32 or h's dtype. Not differentiable. CPU kernel; elsewhere ops.py composes the two.
  m.def("label_attention_score(Tensor h, Tensor mask, Tensor W, Tensor? v, Tensor w) -> Tensor");
  // The head in training, label_attention then relu_dropout_dot, in one op: score[b,l] = sum_d w[d]
  // dropout(relu(ctx))[b,l,d] with ctx = label_attention(h, mask, W, v) (v required) and dropout's mask at
  // ctx's element indices (the two ops' results with the same seed). Returns (score [B,L] in h's dtype, lse
  // [B,L] float32, gate int16 [B,L,(Dv+15)/16]: bit d%16 of word d/16 set where ctx > 0 and the element is
  // kept). The backward returns (grad_h, grad_W, grad_v, grad_w), grad_w in w's dtype. CPU kernel only.
  m.def("label_attention_head(Tensor h, Tensor mask, Tensor W, Tensor v, Tensor w, float p, Tensor seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def(
      "label_attention_head_backward(Tensor grad, Tensor h, Tensor mask, Tensor W, Tensor v, Tensor w, float p, "
      "Tensor seed, Tensor lse, Tensor gate) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same two through the device's matrix products, a block of labels at a
  // time (csrc/label_attention_gemm.h: what CUDA runs for float32), for any
  // device and dtype: private, for the tests, which set the labels per block
  // (0: as the kernel chooses), and for bench_cuda.py's 16-bit rows.
  m.def(
      "_label_attention_gemm(Tensor h, Tensor mask, Tensor W, Tensor? v=None, int block=0) -> (Tensor, Tensor)");
  m.def(
      "_label_attention_gemm_backward(Tensor grad_ctx, Tensor h, Tensor mask, Tensor W, Tensor? v, "
      "Tensor ctx, Tensor lse, int block=0) -> (Tensor, Tensor, Tensor)");
  // label_attention over each document's own labels: ctx[b,k] = label_attention's ctx[b, labels[b,k]]
  // for labels [B,K] int64 in [-1, L), -1 a padding slot (zero context, lse +inf, no gradient).
  // Returns (ctx [B,K,Dv], lse [B,K] float32). sparse_grad says only how autograd hands W's gradient
  // back (ops.py); the kernels ignore it. The backward returns (grad_h, grad_rows, grad_v) with
  // grad_rows [B,K,D] in h's dtype the gradient of the row W[labels[b,k]] from slot (b,k) alone (zero
  // at padding slots): W's gradient is their sum into the rows used, made by the caller.
  m.def(
      "label_attention_shortlist(Tensor h, Tensor mask, Tensor W, Tensor labels, Tensor? v=None, "
      "bool sparse_grad=False) -> (Tensor, Tensor)");
  m.def(
      "label_attention_shortlist_backward(Tensor grad_ctx, Tensor h, Tensor mask, Tensor W, Tensor labels, "
      "Tensor? v, Tensor ctx, Tensor lse) -> (Tensor, Tensor, Tensor)");
  // Ranking metrics of the top k scores against a CSR truth. Returns
  // (sums float64 [4,k], topk int64 [R,k]); sums rows, each summed over the R
  // rows, at ranks 1..k: hits in the top j, nDCG@j, propensity-scored hits in
  // the top j, and the best propensity-scored hits achievable in j.
  m.def(
      "topk_metrics(Tensor scores, Tensor indptr, Tensor indices, int k, "
      "Tensor? inv_prop=None) -> (Tensor, Tensor)");
  // Inverted dropout, after a ReLU when relu=True: y = keep ? f(x) / (1 - p) : 0.
  // The mask is a counter-based stream of (seed, element index) (dropout_mask.h),
  // recomputed in backward: nothing is stored. seed: an int64 scalar tensor on
  // the CPU (a tensor, so that drawing it traces under torch.compile). The
  // backward takes the output y (used when relu=True: the gradient flows where y > 0).
  m.def("dropout(Tensor x, float p, Tensor seed, bool relu) -> Tensor");
  m.def("dropout_backward(Tensor grad, Tensor y, float p, Tensor seed, bool relu) -> Tensor");
  // The tail of the attention head in one pass: out[...] = sum_h w[h] * y[..., h]
  // with y = dropout(relu(x), p, seed), the mask of dropout's stream at x's
  // element indices; y is never written. x [..., H]; w [H] float32 or x's dtype;
  // out x.shape[:-1] in x's dtype. The backward returns (grad_x, grad_w), grad_w
  // in w's dtype, summed over rows in a fixed order.
  m.def("relu_dropout_dot(Tensor x, Tensor w, float p, Tensor seed) -> Tensor");
  m.def("relu_dropout_dot_backward(Tensor grad, Tensor x, Tensor w, float p, Tensor seed) -> (Tensor, Tensor)");
  // Weighted layer-sum: out = sum_i w[i] * xs[i] (w float32 or the inputs' dtype).
  // The backward returns (grad_xs, grad_w), grad_w in w's dtype.
  m.def("layer_sum(Tensor[] xs, Tensor w) -> Tensor");
  m.def("layer_sum_backward(Tensor grad, Tensor[] xs, Tensor w) -> (Tensor[], Tensor)");
}
