// The input contract of every xmcnas_fast op, written once for the CPU
// (csrc/cpu/) and CUDA (csrc/cuda/) entry points: the same inputs are
// accepted or refused, with the same ValueError message, on every device.
// xmcnas_fast/op_contracts.py repeats the checks of label_attention,
// layer_sum and topk_metrics, in this order and with these very messages,
// for the plain-PyTorch references and the fake implementations
// (tests/test_op_contract.py holds the two to each other).
//
// label_attention(h [B,N,D], mask [B,N] bool, W [L,D], v [B,N,Dv]?):
//   h float32, bfloat16, float16 or float64; W and v in h's dtype; all on h's device.
// layer_sum(xs: K >= 1 tensors of one shape and dtype, w [K]):
//   xs float32, float64, bfloat16 or float16; w float32 or the inputs' dtype;
//   all on the device of xs[0].
// topk_metrics(scores [R,L], indptr [R+1], indices, k, inv_prop [L' >= L]?):
//   scores float32, float64, bfloat16 or float16; k in [1, L]; indptr and
//   indices int64 or int32, 1-D; inv_prop 1-D floating; the truth (indptr,
//   indices, inv_prop) on the CPU or on scores' device. Then, from the values,
//   in this order: indptr from 0 to len(indices), non-decreasing; label ids
//   >= 0 and below max(L, L'); no NaN score.
// dropout(x, p, seed, relu): x float32, float64, bfloat16 or float16; p in
//   [0, 1); seed one int64 on the CPU. The backward's grad and y: x's shape.
//
// Only light headers: nvcc compiles this into every .cu file that includes it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace xmcnas_fast::checks {

// torch's spelling of a dtype (float32, bfloat16, int64, ...), as Python prints it.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// `name` lives on ref's device (`ref_name`).
inline void check_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device().str(), " but ", ref_name,
                    " is on ", ref.device().str());
}

// `op`: the name the messages start with (label_attention_shortlist shares these checks).
inline void label_attention_inputs(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                                   const std::optional<at::Tensor>& v, const char* op = "label_attention") {
  TORCH_CHECK_VALUE(h.dim() == 3 && mask.dim() == 2 && W.dim() == 2, op,
                    ": expected h [B,N,D], mask [B,N], W [L,D]; got h ", h.sizes(), ", mask ", mask.sizes(), ", W ",
                    W.sizes());
  TORCH_CHECK_VALUE(mask.size(0) == h.size(0) && mask.size(1) == h.size(1), op, ": mask must be [B,N] = ",
                    h.sizes().slice(0, 2), ", got ", mask.sizes());
  TORCH_CHECK_VALUE(W.size(1) == h.size(2), op, ": W must be [L, D=", h.size(2), "], got ", W.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
                    dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(is_kernel_float(h.scalar_type()), op, ": h must be float32, bfloat16, float16 or float64, got ",
                    dtype_name(h.scalar_type()));
  TORCH_CHECK_VALUE(W.scalar_type() == h.scalar_type(), op, ": W must have h's dtype (", dtype_name(h.scalar_type()),
                    "), got ", dtype_name(W.scalar_type()));
  if (v) {
    TORCH_CHECK_VALUE(v->dim() == 3 && v->size(0) == h.size(0) && v->size(1) == h.size(1), op,
                      ": v must be [B,N,Dv] with [B,N] = ", h.sizes().slice(0, 2), ", got ", v->sizes());
    TORCH_CHECK_VALUE(v->scalar_type() == h.scalar_type(), op, ": v must have h's dtype (",
                      dtype_name(h.scalar_type()), "), got ", dtype_name(v->scalar_type()));
  }
  check_device(op, mask, "mask", h, "h");
  check_device(op, W, "W", h, "h");
  if (v) check_device(op, *v, "v", h, "h");
}

// What the backward takes besides the forward's inputs: grad_ctx and ctx [B,R,Dv] in h's dtype, lse
// [B,R] float32, on h's device; R (named `r` in the messages) = L for label_attention, K for its
// shortlisted form.
inline void attention_saved(const char* op, const char* r, int64_t R, const at::Tensor& h,
                            const std::optional<at::Tensor>& v, const at::Tensor& grad_ctx, const at::Tensor& ctx,
                            const at::Tensor& lse) {
  const int64_t B = h.size(0), Dv = v ? v->size(2) : h.size(2);
  const std::vector<int64_t> ctx_shape{B, R, Dv}, lse_shape{B, R};
  TORCH_CHECK_VALUE(grad_ctx.sizes() == ctx_shape && ctx.sizes() == ctx_shape, op, ": grad_ctx and ctx must be [B,", r,
                    ",Dv] = ", at::IntArrayRef(ctx_shape), ", got ", grad_ctx.sizes(), " and ", ctx.sizes());
  TORCH_CHECK_VALUE(grad_ctx.scalar_type() == h.scalar_type() && ctx.scalar_type() == h.scalar_type(), op,
                    ": grad_ctx and ctx must have h's dtype (", dtype_name(h.scalar_type()), "), got ",
                    dtype_name(grad_ctx.scalar_type()), " and ", dtype_name(ctx.scalar_type()));
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.scalar_type() == at::kFloat, op, ": lse must be float32 [B,", r,
                    "] = ", at::IntArrayRef(lse_shape), ", got ", dtype_name(lse.scalar_type()), " ", lse.sizes());
  check_device(op, grad_ctx, "grad_ctx", h, "h");
  check_device(op, ctx, "ctx", h, "h");
  check_device(op, lse, "lse", h, "h");
}

inline void label_attention_saved(const at::Tensor& h, const at::Tensor& W, const std::optional<at::Tensor>& v,
                                  const at::Tensor& grad_ctx, const at::Tensor& ctx, const at::Tensor& lse) {
  attention_saved("label_attention", "L", W.size(0), h, v, grad_ctx, ctx, lse);
}

// label_attention's checks, then labels [B,K] int64 on h's device (its values: label_attention_shortlist_values).
inline void label_attention_shortlist_inputs(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& W,
                                             const at::Tensor& labels, const std::optional<at::Tensor>& v) {
  const char* op = "label_attention_shortlist";
  label_attention_inputs(h, mask, W, v, op);
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == h.size(0), op, ": labels must be [B,K] with B = ",
                    h.size(0), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                    dtype_name(labels.scalar_type()));
  check_device(op, labels, "labels", h, "h");
}

// Given whether some label id is outside [-1, L).
inline void label_attention_shortlist_values(bool out_of_range, int64_t L) {
  TORCH_CHECK_VALUE(!out_of_range, "label_attention_shortlist: labels must be in [-1, L=", L, ") (-1: padding)");
}

inline void label_attention_shortlist_saved(const at::Tensor& h, const at::Tensor& labels,
                                            const std::optional<at::Tensor>& v, const at::Tensor& grad_ctx,
                                            const at::Tensor& ctx, const at::Tensor& lse) {
  attention_saved("label_attention_shortlist", "K", labels.size(1), h, v, grad_ctx, ctx, lse);
}

// `op` is layer_sum or layer_sum_backward.
inline void layer_sum_inputs(const char* op, at::TensorList xs, const at::Tensor& w) {
  const int64_t K = static_cast<int64_t>(xs.size());
  TORCH_CHECK_VALUE(K >= 1, op, ": expected at least one input tensor");
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, op, ": expected w of shape [K] = [", K, "], got ", w.sizes());
  const at::Tensor& x0 = xs[0];
  const auto dt = x0.scalar_type();
  TORCH_CHECK_VALUE(is_kernel_float(dt), op, ": inputs must be float32, float64, bfloat16 or float16, got ",
                    dtype_name(dt));
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == dt, op,
                    ": w must be float32 or the inputs' dtype (", dtype_name(dt), "), got ",
                    dtype_name(w.scalar_type()));
  for (int64_t i = 1; i < K; ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK_VALUE(x.sizes() == x0.sizes(), op, ": all inputs must have one shape; input ", i, " has ", x.sizes(),
                      ", input 0 has ", x0.sizes());
    TORCH_CHECK_VALUE(x.scalar_type() == dt, op, ": all inputs must have one dtype; input ", i, " is ",
                      dtype_name(x.scalar_type()), ", input 0 is ", dtype_name(dt));
    const std::string name = "input " + std::to_string(i);
    check_device(op, x, name.c_str(), x0, "input 0");
  }
  check_device(op, w, "w", x0, "input 0");
}

// The backward's grad: the inputs' shape and dtype, on their device.
inline void layer_sum_grad(const at::Tensor& grad, const at::Tensor& x0) {
  const char* op = "layer_sum_backward";
  TORCH_CHECK_VALUE(grad.sizes() == x0.sizes() && grad.scalar_type() == x0.scalar_type(), op,
                    ": grad must have the inputs' shape ", x0.sizes(), " and dtype ", dtype_name(x0.scalar_type()),
                    ", got ", grad.sizes(), " ", dtype_name(grad.scalar_type()));
  check_device(op, grad, "grad", x0, "input 0");
}

// The truth tensor `name` lives on the CPU or on scores' device.
inline void check_truth_device(const at::Tensor& t, const char* name, const at::Tensor& scores) {
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == scores.device(), "topk_metrics: ", name, " is on ",
                    t.device().str(), " but must be on the CPU or on scores' device (", scores.device().str(), ")");
}

inline void topk_metrics_inputs(const at::Tensor& scores, const at::Tensor& indptr, const at::Tensor& indices,
                                int64_t k, const std::optional<at::Tensor>& inv_prop) {
  const char* op = "topk_metrics";
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": scores must be [R, L], got shape ", scores.sizes());
  TORCH_CHECK_VALUE(is_kernel_float(scores.scalar_type()), op,
                    ": scores must be float32, float64, bfloat16 or float16, got ", dtype_name(scores.scalar_type()));
  const int64_t R = scores.size(0), L = scores.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= L, op, ": k must be in [1, L=", L, "], got ", k);
  auto csr_part = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
                      " must be int64 or int32, got ", dtype_name(t.scalar_type()));
    check_truth_device(t, name, scores);
  };
  csr_part(indptr, "indptr");
  csr_part(indices, "indices");
  TORCH_CHECK_VALUE(indptr.numel() == R + 1, op, ": indptr must have R+1 = ", R + 1, " entries, has ",
                    indptr.numel());
  if (inv_prop) {
    const at::Tensor& p = *inv_prop;
    TORCH_CHECK_VALUE(p.dim() == 1 && at::isFloatingType(p.scalar_type()), op,
                      ": inv_prop must be a 1-D floating tensor, got ", dtype_name(p.scalar_type()), " of shape ",
                      p.sizes());
    TORCH_CHECK_VALUE(p.numel() >= L, op, ": inv_prop must have at least L = ", L, " entries, has ", p.numel());
    check_truth_device(p, "inv_prop", scores);
  }
}

// The value checks, each given whether it failed, reported in the contract's order.
inline void topk_metrics_values(bool bad_ends, bool decreasing, bool negative, bool too_large, bool nan, int64_t nnz,
                                int64_t n_total) {
  TORCH_CHECK_VALUE(!bad_ends, "topk_metrics: indptr must start at 0 and end at len(indices) = ", nnz);
  TORCH_CHECK_VALUE(!decreasing, "topk_metrics: indptr must be non-decreasing");
  TORCH_CHECK_VALUE(!negative, "topk_metrics: label indices must be >= 0");
  TORCH_CHECK_VALUE(!too_large, "topk_metrics: a label index is >= the number of labels (", n_total, ")");
  TORCH_CHECK_VALUE(!nan, "topk_metrics: scores contain NaN");
}

// The head's last weights w [Dv] of label_attention_score and label_attention_head: float32 or h's dtype,
// on h's device.
inline void head_weights(const char* op, const at::Tensor& h, const at::Tensor& w, int64_t Dv) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == Dv, op, ": w must be [Dv] with Dv = ", Dv, ", got ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == h.scalar_type(), op,
                    ": w must be float32 or h's dtype (", dtype_name(h.scalar_type()), "), got ",
                    dtype_name(w.scalar_type()));
  check_device(op, w, "w", h, "h");
}

// `op` is dropout or dropout_backward; x is the input (the backward: grad).
inline void dropout_inputs(const char* op, const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(is_kernel_float(x.scalar_type()), op, ": x must be float32, float64, bfloat16 or float16, got ",
                    dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
                    ": seed must be one int64 on the CPU");
}

inline void dropout_output(const at::Tensor& grad, const at::Tensor& y) {
  const char* op = "dropout_backward";
  TORCH_CHECK_VALUE(grad.sizes() == y.sizes(), op, ": grad ", grad.sizes(), " and output ", y.sizes(),
                    " differ in shape");
  check_device(op, y, "output", grad, "grad");
}

// `op` is relu_dropout_dot or relu_dropout_dot_backward.
inline void relu_dropout_dot_inputs(const char* op, const at::Tensor& x, const at::Tensor& w, double p,
                                    const at::Tensor& seed) {
  dropout_inputs(op, x, p, seed);
  TORCH_CHECK_VALUE(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op,
                    ": w must be [H] with H = x's last size (", x.dim() >= 1 ? x.size(-1) : 0, "), got ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == x.scalar_type(), op,
                    ": w must be float32 or x's dtype (", dtype_name(x.scalar_type()), "), got ",
                    dtype_name(w.scalar_type()));
  check_device(op, w, "w", x, "x");
}

inline void relu_dropout_dot_grad(const at::Tensor& grad, const at::Tensor& x) {
  const char* op = "relu_dropout_dot_backward";
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes().slice(0, x.dim() - 1), op, ": grad must be x's shape without its last "
                    "size (", x.sizes().slice(0, x.dim() - 1), "), got ", grad.sizes());
  check_device(op, grad, "grad", x, "x");
}

}  // namespace xmcnas_fast::checks
