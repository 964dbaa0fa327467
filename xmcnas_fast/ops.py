"""The one Python face of xmcnas_fast's kernels.

Each operator has
  * a schema in csrc/ops.cpp and kernels in csrc/cpu/ and csrc/cuda/, which
    accept and refuse the same inputs with the same messages (csrc/checks.h,
    and its Python twin op_contracts.py for the references and fakes);
  * here: its fake (meta) implementation and autograd registration, so that it
    works under autograd and torch.compile;
  * here too: a plain-PyTorch reference, the oracle of the tests and the
    fallback when the compiled extension is missing or was built for another
    torch (a warning says so once, at import). The references check their
    inputs as the kernels do, with the very same messages.

Public functions: label_attention, label_attention_score, label_attention_head, label_attention_shortlist,
topk_metrics, layer_sum, dropout, relu_dropout_dot. Use these, never torch.ops.xmcnas_fast directly: they choose the
compiled op or the reference.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .op_contracts import (check_label_attention_inputs, check_label_attention_shortlist_inputs,
                           check_label_attention_shortlist_values, check_layer_sum_inputs,
                           check_relu_dropout_dot_inputs, check_topk_metrics_inputs)

__all__ = [
    "label_attention", "label_attention_score", "label_attention_shortlist", "topk_metrics", "layer_sum", "dropout",
    "relu_dropout_dot", "label_attention_head", "label_attention_reference", "label_attention_score_reference",
    "label_attention_shortlist_reference", "topk_metrics_reference", "layer_sum_reference", "dropout_reference",
    "relu_dropout_dot_reference", "label_attention_head_reference",
    "EXTENSION_LOADED", "extension_status", "has_kernel",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


class ExtensionFallbackWarning(RuntimeWarning):
    """The compiled kernels are not in use; the slower references are."""


def _load_extension() -> tuple[bool, str]:
    """Import xmcnas_fast._C if it was built for the running torch."""
    if os.environ.get("XMCNAS_DISABLE_EXTENSION", "0") == "1":
        return False, "disabled by XMCNAS_DISABLE_EXTENSION=1"
    info_path = os.path.join(_HERE, "_build_info.json")
    rebuild = "rebuild it with `pip install --no-build-isolation --force-reinstall .` (or `-e .`) in this environment"
    try:
        with open(info_path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return False, f"the compiled extension is not built; {rebuild}"
    except (OSError, ValueError) as e:
        return False, f"{info_path} is unreadable ({e}); {rebuild}"
    if info.get("torch") != torch.__version__:
        return False, (f"the compiled extension was built against torch {info.get('torch')} "
                       f"but torch {torch.__version__} is running; {rebuild}")
    try:
        from . import _C  # noqa: F401  (loading registers the ops)
    except ImportError as e:
        return False, f"the compiled extension failed to load ({e}); {rebuild}"
    return True, f"compiled kernels for torch {info['torch']}" + (" with CUDA" if info.get("cuda") else " (CPU only)")


EXTENSION_LOADED, _STATUS = _load_extension()
if not EXTENSION_LOADED:
    warnings.warn(f"xmcnas_fast: using the plain-PyTorch reference ops: {_STATUS}",
                  ExtensionFallbackWarning, stacklevel=2)


def extension_status() -> str:
    """One line saying which kernels are in use and why."""
    return _STATUS


_OPS = ("label_attention", "label_attention_backward", "label_attention_score", "label_attention_shortlist",
        "label_attention_shortlist_backward", "topk_metrics", "layer_sum", "layer_sum_backward",
        "dropout", "dropout_backward", "relu_dropout_dot", "relu_dropout_dot_backward", "label_attention_head",
        "label_attention_head_backward")
# which compiled op has a kernel for which device: asked once, so that choosing traces under torch.compile


def _dispatch_has_kernel(op: str, key: str) -> bool:
    """Whether the loaded extension has a kernel of `op` for dispatch key `key` (False for an op that an
    older build does not define)."""
    try:
        return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"xmcnas_fast::{op}", key)
    except RuntimeError:
        return False


_KERNELS = {(op, dev): _dispatch_has_kernel(op, key) for op in _OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


# whether the CPU has AVX-512, as torch sees it (the kernels' own check also honours XMCNAS_CPU_ISA=generic)
_CPU_AVX512 = (torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
               and os.environ.get("XMCNAS_CPU_ISA", "") != "generic")


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled op `op` has a kernel for `device_type` ("cpu", "cuda")."""
    return _KERNELS.get((op, device_type), False)


# --------------------------------------------------------------------------------------------
# References: plain PyTorch, differentiable through autograd. The tests' oracle.
# --------------------------------------------------------------------------------------------

def label_attention_reference(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor,
                              v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """AttentionXML's MLAttention: scores [B,L,N] materialised, masked softmax over tokens.

    The values are v [B,N,Dv] if given, else h. A row without any real token
    gives a zero context (not NaN). Inputs as label_attention takes them.
    """
    check_label_attention_inputs(h, mask, W, v)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.autocast(h.device.type, enabled=False):                   # float32 under autocast too
        scores = torch.matmul(W.to(acc), h.to(acc).transpose(1, 2))     # [B, L, N]
        m = mask.unsqueeze(1)                                            # [B, 1, N]
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1) * m                            # all-padding rows -> 0
        return torch.matmul(p, (h if v is None else v).to(acc)).to(h.dtype)  # [B, L, Dv]


def check_label_attention_score_inputs(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor,
                                       v: Optional[torch.Tensor], w: torch.Tensor) -> None:
    """Raise ValueError, as the compiled op does, unless (h, mask, W, v, w) is a valid label_attention_score input."""
    check_label_attention_inputs(h, mask, W, v)
    _check_head_weights("label_attention_score", h, w, (h if v is None else v).shape[2])


def _check_head_weights(op: str, h: torch.Tensor, w: torch.Tensor, Dv: int) -> None:
    """The head's last weights w [Dv]: float32 or h's dtype, on h's device (csrc/checks.h's head_weights)."""
    if w.dim() != 1 or w.shape[0] != Dv:
        raise ValueError(f"{op}: w must be [Dv] with Dv = {Dv}, got {list(w.shape)}")
    if w.dtype not in (torch.float32, h.dtype):
        raise ValueError(f"{op}: w must be float32 or h's dtype ({str(h.dtype).removeprefix('torch.')}), "
                         f"got {str(w.dtype).removeprefix('torch.')}")
    if w.device != h.device:
        raise ValueError(f"{op}: w is on {w.device} but h is on {h.device}")


def label_attention_score_reference(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, v: Optional[torch.Tensor],
                                    w: torch.Tensor) -> torch.Tensor:
    """relu(label_attention_reference(h, mask, W, v)) @ w, in h's dtype."""
    check_label_attention_score_inputs(h, mask, W, v, w)
    return F.relu(label_attention_reference(h, mask, W, v)) @ w.to(h.dtype)


def check_label_attention_head_inputs(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, v: torch.Tensor,
                                      w: torch.Tensor, p: float, op: str = "label_attention_head") -> None:
    """Raise ValueError, as the compiled op does, unless (h, mask, W, v, w, p) is a valid label_attention_head
    input (the seed, drawn by ops.label_attention_head itself, is always valid)."""
    check_label_attention_inputs(h, mask, W, v, op)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: p must be in [0, 1), got {p:g}")
    _check_head_weights(op, h, w, v.shape[2])


def label_attention_head_reference(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, v: Optional[torch.Tensor],
                                   w: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """relu_dropout_dot_reference(label_attention_reference(h, mask, W, v), w, p, training): the head's
    scores [B, L] through torch's own dropout (another random stream)."""
    check_label_attention_head_inputs(h, mask, W, h if v is None else v, w, p)
    return relu_dropout_dot_reference(label_attention_reference(h, mask, W, v), w, p, training)


def label_attention_shortlist_reference(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                                        v: Optional[torch.Tensor] = None, sparse_grad: bool = False) -> torch.Tensor:
    """label_attention over each document's own labels: the rows W[labels[b]] gathered ([B,K,D]; zeros
    at padding ids -1), then the dense math of label_attention_reference with scores [B,K,N]; padding
    slots give zero rows and no gradient. With sparse_grad, W's gradient is a sparse COO tensor of the
    rows used (the gather is F.embedding(sparse=True)). Inputs as label_attention_shortlist takes them."""
    check_label_attention_shortlist_inputs(h, mask, W, labels, v)
    check_label_attention_shortlist_values(labels, W.shape[0])
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    valid = labels >= 0                                                  # [B, K]
    with torch.autocast(h.device.type, enabled=False):
        rows = F.embedding(labels[valid], W, sparse=sparse_grad)         # [nvalid, D]
        Wk = W.new_zeros(*labels.shape, W.shape[1]).masked_scatter(valid.unsqueeze(-1), rows)
        scores = torch.matmul(Wk.to(acc), h.to(acc).transpose(1, 2))    # [B, K, N]
        m = mask.unsqueeze(1)                                            # [B, 1, N]
        scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        p = torch.softmax(scores, dim=-1) * m * valid.unsqueeze(-1)      # empty rows, padding slots -> 0
        return torch.matmul(p, (h if v is None else v).to(acc)).to(h.dtype)  # [B, K, Dv]


def topk_metrics_reference(scores: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, k: int,
                           inv_prop: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full stable sort (ties: lower label index first), then pyxclib's definitions.

    Truth indices >= L (labels the model cannot score, e.g. unseen in training)
    count as true labels that are never hit. Returns (sums [4,k] float64, topk [R,k] int64).
    """
    check_topk_metrics_inputs(scores, indptr, indices, k, inv_prop)
    R, L = scores.shape
    n_total = L if inv_prop is None else inv_prop.numel()
    ptr = indptr.cpu().long()
    ids = indices.cpu().long()
    if int(ptr[0]) != 0 or int(ptr[-1]) != ids.numel():
        raise ValueError(f"topk_metrics: indptr must start at 0 and end at len(indices) = {ids.numel()}")
    if R and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError("topk_metrics: indptr must be non-decreasing")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("topk_metrics: label indices must be >= 0")
    if ids.numel() and int(ids.max()) >= n_total:
        raise ValueError(f"topk_metrics: a label index is >= the number of labels ({n_total})")
    if bool(torch.isnan(scores).any()):
        raise ValueError("topk_metrics: scores contain NaN")
    indptr, indices = ptr, ids
    topk = torch.sort(scores.float().cpu() if scores.dtype != torch.float64 else scores.cpu(),
                      dim=1, descending=True, stable=True).indices[:, :k]
    counts = (indptr[1:] - indptr[:-1]).cpu()
    rows = torch.repeat_interleave(torch.arange(R), counts)
    truth = torch.zeros(R, n_total, dtype=torch.float64)
    truth[rows, indices.cpu().long()] = 1.0
    hit = truth.gather(1, topk)                                          # [R, k]
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)  # rank weights
    dcg = (hit * disc).cumsum(1)
    n_true = counts.to(torch.float64).unsqueeze(1)
    ideal = disc.cumsum(0)[torch.minimum(torch.arange(k).unsqueeze(0), counts.unsqueeze(1) - 1).clamp(min=0)]
    ndcg = torch.where(n_true > 0, dcg / ideal, torch.zeros_like(dcg))
    sums = torch.zeros(4, k, dtype=torch.float64)
    sums[0] = hit.cumsum(1).sum(0)
    sums[1] = ndcg.sum(0)
    if inv_prop is not None:
        ip = inv_prop.cpu().to(torch.float64)
        ip = torch.cat([ip, torch.zeros(n_total - ip.numel(), dtype=torch.float64)])
        sums[2] = (hit * ip[topk]).cumsum(1).sum(0)
        best = torch.sort(truth * ip, dim=1, descending=True).values[:, :k]
        sums[3] = best.cumsum(1).sum(0)
    return sums, topk.to(scores.device)


def layer_sum_reference(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """sum_i w[i] * xs[i], through a stacked copy (what the kernel avoids). Inputs as layer_sum takes them."""
    check_layer_sum_inputs(xs, w)
    return (torch.stack(list(xs), 0) * w.to(xs[0].dtype).view(-1, *([1] * xs[0].dim()))).sum(0)


def dropout_reference(x: torch.Tensor, p: float, training: bool = True, relu: bool = False) -> torch.Tensor:
    """torch's own: F.dropout(F.relu(x)) (same distribution as the kernel, another random stream)."""
    return F.dropout(F.relu(x) if relu else x, p, training)


def relu_dropout_dot_reference(x: torch.Tensor, w: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """dropout(relu(x)) @ w in x's dtype, through torch's own dropout (another random stream)."""
    check_relu_dropout_dot_inputs(x, w, p)
    return F.dropout(F.relu(x), p, training) @ w.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd for the compiled ops.
# --------------------------------------------------------------------------------------------

def _op_defined(op: str) -> bool:
    """Whether the loaded extension defines the schema of `op` (an older build may not)."""
    return _dispatch_has_kernel(op, "CPU")


def _real_slots(grad_rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R], rows [R,D]): the label ids of the real slots (labels >= 0), in slot order, and their rows of
    grad_rows [B,K,D] (a view when there is no padding), for CPU tensors outside tracing. The selection runs
    in numpy, on one thread: a handful of torch's small parallel ops cost more than the kernel's whole
    backward on a busy machine."""
    D = grad_rows.shape[-1]
    flat, rows = labels.reshape(-1), grad_rows.reshape(-1, D)
    keep = np.flatnonzero(flat.numpy() >= 0)
    if keep.size == flat.numel():
        return flat.clone(), rows  # the gradient must not change with the caller's labels
    bits = rows.view(torch.int16) if rows.dtype in (torch.bfloat16, torch.float16) else rows  # numpy has no bf16
    return torch.from_numpy(flat.numpy()[keep]), torch.from_numpy(bits.numpy()[keep]).view(rows.dtype)


def _rows_to_grad_W(grad_rows: torch.Tensor, labels: torch.Tensor, W: torch.Tensor, sparse: bool) -> torch.Tensor:
    """W's gradient from the per-slot rows grad_rows [B,K,D] (zeros at padding slots): summed into the rows
    used. sparse: a COO tensor [L,D] holding only the rows of real slots (uncoalesced, as
    nn.Embedding(sparse=True) gives: a label twice in the shortlist is two entries); else dense [L,D],
    zero outside the rows used, summed in float32 (float64 for float64) through the COO tensor's to_dense
    (on the CPU as fast as the zeros it writes; index_add_ takes twice that)."""
    flat, rows = labels.reshape(-1), grad_rows.reshape(-1, W.shape[1])
    if W.device.type == "cpu" and type(labels) is torch.Tensor and type(grad_rows) is torch.Tensor:  # not traced
        flat, rows = _real_slots(grad_rows, labels)
    elif sparse:
        keep = torch.nonzero(flat >= 0).squeeze(1)
        flat, rows = flat.index_select(0, keep), rows.index_select(0, keep)
    else:  # the padding slots' zero rows added to row 0: no host sync, no data-dependent size
        flat = flat.clamp(min=0)
    if sparse:  # the kernels checked the ids
        return torch.sparse_coo_tensor(flat.unsqueeze(0), rows, W.shape, device=W.device, check_invariants=False)
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    summed = torch.sparse_coo_tensor(flat.unsqueeze(0), rows.to(acc), W.shape, device=W.device, check_invariants=False)
    return summed.to_dense().to(W.dtype)


if EXTENSION_LOADED:

    @torch.library.register_fake("xmcnas_fast::label_attention")
    def _label_attention_fake(h, mask, W, v=None):
        check_label_attention_inputs(h, mask, W, v)  # the kernels' contract, under torch.compile too
        B, L, Dv = h.shape[0], W.shape[0], (h if v is None else v).shape[2]
        return h.new_empty(B, L, Dv), h.new_empty(B, L, dtype=torch.float32)

    @torch.library.register_fake("xmcnas_fast::label_attention_backward")
    def _label_attention_backward_fake(grad_ctx, h, mask, W, v, ctx, lse):
        return torch.empty_like(h), torch.empty_like(W), h.new_empty(0) if v is None else torch.empty_like(v)

    def _label_attention_setup(ctx, inputs, output):
        h, mask, W, v = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(h, mask, W, v, out, lse)

    def _label_attention_backward(ctx, grad_out, grad_lse):
        h, mask, W, v, out, lse = ctx.saved_tensors
        grad_h, grad_W, grad_v = torch.ops.xmcnas_fast.label_attention_backward(
            grad_out.contiguous(), h, mask, W, v, out, lse)
        return grad_h, None, grad_W, None if v is None else grad_v

    torch.library.register_autograd("xmcnas_fast::label_attention", _label_attention_backward,
                                    setup_context=_label_attention_setup)

    if has_kernel("label_attention_score", "cpu") or has_kernel("label_attention_score", "cuda"):
        @torch.library.register_fake("xmcnas_fast::label_attention_score")
        def _label_attention_score_fake(h, mask, W, v, w):
            check_label_attention_score_inputs(h, mask, W, v, w)
            return h.new_empty(h.shape[0], W.shape[0])

    if _op_defined("label_attention_shortlist"):

        @torch.library.register_fake("xmcnas_fast::label_attention_shortlist")
        def _label_attention_shortlist_fake(h, mask, W, labels, v=None, sparse_grad=False):
            check_label_attention_shortlist_inputs(h, mask, W, labels, v)  # the label ids are checked by the kernels
            B, K, Dv = h.shape[0], labels.shape[1], (h if v is None else v).shape[2]
            return h.new_empty(B, K, Dv), h.new_empty(B, K, dtype=torch.float32)

        @torch.library.register_fake("xmcnas_fast::label_attention_shortlist_backward")
        def _label_attention_shortlist_backward_fake(grad_ctx, h, mask, W, labels, v, ctx, lse):
            return (torch.empty_like(h), h.new_empty(*labels.shape, W.shape[1]),
                    h.new_empty(0) if v is None else torch.empty_like(v))

        def _label_attention_shortlist_setup(ctx, inputs, output):
            h, mask, W, labels, v, ctx.sparse_grad = inputs
            out, lse = output
            ctx.mark_non_differentiable(lse)
            ctx.set_materialize_grads(False)  # no zeros made for lse's gradient
            ctx.save_for_backward(h, mask, W, labels, v, out, lse)

        def _label_attention_shortlist_backward(ctx, grad_out, grad_lse):
            if grad_out is None:
                return None, None, None, None, None, None
            h, mask, W, labels, v, out, lse = ctx.saved_tensors
            grad_h, grad_rows, grad_v = torch.ops.xmcnas_fast.label_attention_shortlist_backward(
                grad_out.contiguous(), h, mask, W, labels, v, out, lse)
            grad_W = _rows_to_grad_W(grad_rows, labels, W, ctx.sparse_grad) if ctx.needs_input_grad[2] else None
            return grad_h, None, grad_W, None, None if v is None else grad_v, None

        torch.library.register_autograd("xmcnas_fast::label_attention_shortlist", _label_attention_shortlist_backward,
                                        setup_context=_label_attention_shortlist_setup)

    @torch.library.register_fake("xmcnas_fast::topk_metrics")
    def _topk_metrics_fake(scores, indptr, indices, k, inv_prop=None):
        check_topk_metrics_inputs(scores, indptr, indices, k, inv_prop)
        return (scores.new_empty(4, k, dtype=torch.float64),
                scores.new_empty(scores.shape[0], k, dtype=torch.int64))

    @torch.library.register_fake("xmcnas_fast::layer_sum")
    def _layer_sum_fake(xs, w):
        check_layer_sum_inputs(xs, w)
        return torch.empty_like(xs[0])

    @torch.library.register_fake("xmcnas_fast::layer_sum_backward")
    def _layer_sum_backward_fake(grad, xs, w):
        return [torch.empty_like(x) for x in xs], torch.empty_like(w)

    def _layer_sum_setup(ctx, inputs, output):
        xs, w = inputs
        ctx.save_for_backward(w, *xs)

    def _layer_sum_backward(ctx, grad):
        w, *xs = ctx.saved_tensors
        grad_xs, grad_w = torch.ops.xmcnas_fast.layer_sum_backward(grad.contiguous(), xs, w)
        return list(grad_xs), grad_w

    torch.library.register_autograd("xmcnas_fast::layer_sum", _layer_sum_backward,
                                    setup_context=_layer_sum_setup)

    @torch.library.register_fake("xmcnas_fast::dropout")
    def _dropout_fake(x, p, seed, relu):
        return torch.empty_like(x)

    @torch.library.register_fake("xmcnas_fast::dropout_backward")
    def _dropout_backward_fake(grad, y, p, seed, relu):
        return torch.empty_like(grad)

    def _dropout_setup(ctx, inputs, output):
        _, ctx.p, seed, ctx.relu = inputs
        ctx.save_for_backward(output if ctx.relu else None, seed)

    def _dropout_backward(ctx, grad):
        y, seed = ctx.saved_tensors
        y = grad if y is None else y  # without the ReLU the mask comes from the seed alone
        return torch.ops.xmcnas_fast.dropout_backward(grad, y, ctx.p, seed, ctx.relu), None, None, None

    torch.library.register_autograd("xmcnas_fast::dropout", _dropout_backward, setup_context=_dropout_setup)

    @torch.library.register_fake("xmcnas_fast::relu_dropout_dot")
    def _relu_dropout_dot_fake(x, w, p, seed):
        check_relu_dropout_dot_inputs(x, w, p)
        return x.new_empty(x.shape[:-1])

    @torch.library.register_fake("xmcnas_fast::relu_dropout_dot_backward")
    def _relu_dropout_dot_backward_fake(grad, x, w, p, seed):
        check_relu_dropout_dot_inputs(x, w, p, "relu_dropout_dot_backward")
        return torch.empty_like(x), torch.empty_like(w)

    def _relu_dropout_dot_setup(ctx, inputs, output):
        x, w, ctx.p, seed = inputs
        ctx.save_for_backward(x, w, seed)     # x: the attention's output, which its own backward keeps

    def _relu_dropout_dot_backward(ctx, grad):
        x, w, seed = ctx.saved_tensors
        gx, gw = torch.ops.xmcnas_fast.relu_dropout_dot_backward(grad, x, w, ctx.p, seed)
        return gx, gw, None, None

    torch.library.register_autograd("xmcnas_fast::relu_dropout_dot", _relu_dropout_dot_backward,
                                    setup_context=_relu_dropout_dot_setup)


    if _op_defined("label_attention_head"):

        @torch.library.register_fake("xmcnas_fast::label_attention_head")
        def _label_attention_head_fake(h, mask, W, v, w, p, seed):
            check_label_attention_head_inputs(h, mask, W, v, w, p)
            B, L, words = h.shape[0], W.shape[0], (v.shape[2] + 15) // 16
            return (h.new_empty(B, L), h.new_empty(B, L, dtype=torch.float32),
                    h.new_empty(B, L, words, dtype=torch.int16))

        @torch.library.register_fake("xmcnas_fast::label_attention_head_backward")
        def _label_attention_head_backward_fake(grad, h, mask, W, v, w, p, seed, lse, gate):
            check_label_attention_head_inputs(h, mask, W, v, w, p, "label_attention_head_backward")
            return torch.empty_like(h), torch.empty_like(W), torch.empty_like(v), torch.empty_like(w)

        def _label_attention_head_setup(ctx, inputs, output):
            h, mask, W, v, w, ctx.p, seed = inputs
            _, lse, gate = output
            ctx.mark_non_differentiable(lse, gate)
            ctx.set_materialize_grads(False)  # no zeros made for lse's and the gate's gradients
            ctx.save_for_backward(h, mask, W, v, w, seed, lse, gate)

        def _label_attention_head_backward(ctx, grad, grad_lse, grad_gate):
            if grad is None:
                return None, None, None, None, None, None, None
            h, mask, W, v, w, seed, lse, gate = ctx.saved_tensors
            grad_h, grad_W, grad_v, grad_w = torch.ops.xmcnas_fast.label_attention_head_backward(
                grad.contiguous(), h, mask, W, v, w, ctx.p, seed, lse, gate)
            return grad_h, None, grad_W, grad_v, grad_w, None, None

        torch.library.register_autograd("xmcnas_fast::label_attention_head", _label_attention_head_backward,
                                        setup_context=_label_attention_head_setup)


def _compiled(op: str, device: torch.device) -> bool:
    return has_kernel(op, device.type)


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------

def label_attention(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor,
                    v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Label-wise attention (AttentionXML's MLAttention) without the [B,L,N] score tensor.

    h: [B,N,D] token states (float32, bfloat16, float16 or float64); mask: [B,N],
    True (nonzero) for real tokens; W: [L,D] one attention vector per label, in h's
    dtype; v: optional values [B,N,Dv], in h's dtype (h itself when None); all on
    one device. Returns ctx [B,L,Dv] in h's dtype:
    ctx[b,l] = sum_n softmax_n(W[l] . h[b,n] over real tokens) v[b,n]; a row with
    no real token gives zeros. Other inputs raise ValueError, with the same
    message on every device and from the reference fallback.

    Since the weights of a row sum to 1, a linear layer after the attention
    folds into the values: Linear(label_attention(h, mask, W)) equals
    label_attention(h, mask, W, Linear(h)) on rows with a real token (rows
    without one give zeros instead of the bias).
    """
    mask = mask.bool()
    if _compiled("label_attention", h.device):
        return torch.ops.xmcnas_fast.label_attention(h, mask, W, v)[0]
    return label_attention_reference(h, mask, W, v)


def label_attention_score(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, v: Optional[torch.Tensor],
                          w: torch.Tensor) -> torch.Tensor:
    """The attention head's scores out of training: relu_dropout_dot(label_attention(h, mask, W, v), w,
    training=False), [B, L] in h's dtype, in one pass that never writes the [B, L, Dv] context (on the CPU;
    elsewhere, and whenever a gradient is wanted, the two ops). Inputs as label_attention takes them, and
    w [Dv] float32 or h's dtype."""
    mask = mask.bool()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, W, v, w))
    if not grad and _compiled("label_attention_score", h.device):
        return torch.ops.xmcnas_fast.label_attention_score(h, mask, W, v, w)
    check_label_attention_score_inputs(h, mask, W, v, w)
    return relu_dropout_dot(label_attention(h, mask, W, v), w, 0.0, training=False)


def _head_packs(h: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether label_attention_head's CPU kernel takes its packed path for these shapes (float32, rows of at
    most 64 tokens, D and Dv at most 128, AVX-512: csrc/cpu/label_attention_plan.h), where it beats the two
    ops; from the shapes alone (the padded length, not the real tokens), so that the choice traces."""
    return (h.dtype == torch.float32 and w.dtype == torch.float32 and h.shape[1] <= 64 and h.shape[2] <= 128
            and v.shape[2] <= 128 and _CPU_AVX512)


def label_attention_head(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, v: Optional[torch.Tensor],
                         w: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """The attention head's scores, relu_dropout_dot(label_attention(h, mask, W, v), w, p, training), [B, L] in
    h's dtype. In training on the CPU, where the shapes are short texts' (see _head_packs), one op that never
    writes the [B, L, Dv] context nor its gradient: the backward makes what it needs from a bit a context
    element (ReLU and dropout's gate) and the saved log-sum-exp. Its dropout mask is relu_dropout_dot's (the
    same draw from torch's generator gives the same scores). Elsewhere the two ops; out of training with no
    gradient wanted, label_attention_score. Inputs as label_attention_score takes them, and p in [0, 1)."""
    mask = mask.bool()
    vals = h if v is None else v
    if not training:
        p = 0.0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, W, v, w))
    if p == 0.0 and not grad:
        return label_attention_score(h, mask, W, v, w)
    if _compiled("label_attention_head", h.device) and _head_packs(h, vals, w):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else torch.zeros((), dtype=torch.int64)
        return torch.ops.xmcnas_fast.label_attention_head(h, mask, W, vals, w, float(p), seed)[0]
    check_label_attention_head_inputs(h, mask, W, vals, w, p)
    return relu_dropout_dot(label_attention(h, mask, W, v), w, p, training)


def label_attention_shortlist(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                              v: Optional[torch.Tensor] = None, *, sparse_grad: bool = False) -> torch.Tensor:
    """label_attention restricted to each document's own shortlist of labels.

    h, mask, W, v as label_attention takes them; labels: [B,K] int64 on h's device, the label ids
    (rows of W) of document b in labels[b] (duplicates allowed, K may exceed L), -1 for padding slots.
    Returns ctx [B,K,Dv] in h's dtype: ctx[b,k] = label_attention(h, mask, W, v)[b, labels[b,k]], zeros
    (and no gradient) for a padding slot or a document with no real token, without computing the other
    labels. W's gradient touches only the rows used: dense [L,D] (zeros elsewhere) by default; with
    sparse_grad=True a sparse COO tensor of those rows, as nn.Embedding(sparse=True) gives, for
    optimizers that update only them (torch.optim.SparseAdam, SGD, Adagrad). Ids outside [-1, L) and
    the inputs label_attention refuses raise ValueError, with the same message on every device and
    from the reference fallback.
    """
    mask = mask.bool()
    if _compiled("label_attention_shortlist", h.device):
        return torch.ops.xmcnas_fast.label_attention_shortlist(h, mask, W, labels, v, bool(sparse_grad))[0]
    return label_attention_shortlist_reference(h, mask, W, labels, v, sparse_grad)


def topk_metrics(scores: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, k: int,
                 inv_prop: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ranking metrics of a batch of scores, summed over its rows.

    scores [R,L]; the truth as CSR (indptr [R+1], indices: label ids, int64);
    ids >= L are true labels the scores cannot rank (they lower recall-type
    metrics, they are never hit). inv_prop [L'] (optional, L' >= L): inverse
    propensities for PSP@k. Ties between equal scores rank the lower label id first.

    Returns (sums, topk): sums [4,k] float64, summed over rows, at ranks j=1..k:
    hits in the top j, nDCG@j, propensity-weighted hits in the top j, and the
    best propensity-weighted hits achievable in j (PSP@j = sums[2]/sums[3]);
    topk [R,k] int64, the label ids ranked first.
    Raises ValueError on NaN scores, k outside [1, L] or a malformed CSR, with
    the same message on every device and from the reference fallback.
    """
    if _compiled("topk_metrics", scores.device):
        return torch.ops.xmcnas_fast.topk_metrics(scores, indptr, indices, int(k), inv_prop)
    return topk_metrics_reference(scores, indptr, indices, int(k), inv_prop)


def layer_sum(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Weighted layer-sum sum_i w[i] * xs[i] with no stacked copy of the inputs.

    xs: K >= 1 tensors of one shape and dtype (float32, float64, bfloat16 or
    float16) on one device; w: [K], float32 or the inputs' dtype, on their
    device. Differentiable in xs and w. Other inputs raise ValueError, with the
    same message on every device and from the reference fallback.
    """
    xs = list(xs)
    if _compiled("layer_sum", (xs[0] if xs else w).device):
        return torch.ops.xmcnas_fast.layer_sum(xs, w)
    return layer_sum_reference(xs, w)


def dropout(x: torch.Tensor, p: float, training: bool = True, relu: bool = False) -> torch.Tensor:
    """Inverted dropout, fused after a ReLU when `relu`: one pass, no stored mask.

    The mask is drawn from a counter-based stream seeded from torch's default
    generator (torch.manual_seed makes it repeatable) and recomputed in backward.
    Out of training (or p == 0) it is the identity (or the ReLU).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p:g}")  # as csrc/checks.h prints it
    if not training or p == 0.0:
        return F.relu(x) if relu else x
    if _compiled("dropout", x.device):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)   # torch's default generator
        return torch.ops.xmcnas_fast.dropout(x, float(p), seed, bool(relu))
    return dropout_reference(x, p, training, relu)


def relu_dropout_dot(x: torch.Tensor, w: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """sum_h w[h] * dropout(relu(x))[..., h]: the attention head's tail (ReLU, dropout, the last
    product) in one pass that never writes dropout(relu(x)), whose [B, L, H] size dominates a CPU
    step with thousands of labels. The mask is dropout's (the same seed gives dropout(x, relu=True)
    @ w); out of training (or p == 0) nothing is dropped. A CPU kernel; on other devices the two
    steps: dropout (fused with the ReLU there too), then the product."""
    check_relu_dropout_dot_inputs(x, w, p)
    if not training:
        p = 0.0
    if _compiled("relu_dropout_dot", x.device):
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else torch.zeros((), dtype=torch.int64)
        return torch.ops.xmcnas_fast.relu_dropout_dot(x, w, float(p), seed)
    return dropout(x, p, training, relu=True) @ w.to(x.dtype)
