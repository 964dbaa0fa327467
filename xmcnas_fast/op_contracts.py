"""The input contracts of the compiled ops, for the plain-PyTorch references in ops.py and the fake
implementations: csrc/checks.h check for check, in its order, with its very messages, so that an input is
refused alike by the kernels of every device, under torch.compile, and by the reference fallback."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["check_label_attention_inputs", "check_label_attention_shortlist_inputs",
           "check_label_attention_shortlist_values", "check_layer_sum_inputs", "check_topk_metrics_inputs",
           "check_relu_dropout_dot_inputs"]

_KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_device(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_label_attention_inputs(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor,
                                 v: Optional[torch.Tensor] = None, op: str = "label_attention") -> None:
    """Raise ValueError, as the compiled op does, unless (h, mask, W, v) is a valid label_attention input
    (`op`: the name the message starts with)."""
    if h.dim() != 3 or mask.dim() != 2 or W.dim() != 2:
        raise ValueError(f"{op}: expected h [B,N,D], mask [B,N], W [L,D]; got h {_shape(h)}, "
                         f"mask {_shape(mask)}, W {_shape(W)}")
    if mask.shape != h.shape[:2]:
        raise ValueError(f"{op}: mask must be [B,N] = {list(h.shape[:2])}, got {_shape(mask)}")
    if W.shape[1] != h.shape[2]:
        raise ValueError(f"{op}: W must be [L, D={h.shape[2]}], got {_shape(W)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: mask must be bool, got {_dtype(mask)}")
    if h.dtype not in _KERNEL_FLOATS:
        raise ValueError(f"{op}: h must be float32, bfloat16, float16 or float64, got {_dtype(h)}")
    if W.dtype != h.dtype:
        raise ValueError(f"{op}: W must have h's dtype ({_dtype(h)}), got {_dtype(W)}")
    if v is not None:
        if v.dim() != 3 or v.shape[:2] != h.shape[:2]:
            raise ValueError(f"{op}: v must be [B,N,Dv] with [B,N] = {list(h.shape[:2])}, got {_shape(v)}")
        if v.dtype != h.dtype:
            raise ValueError(f"{op}: v must have h's dtype ({_dtype(h)}), got {_dtype(v)}")
    _check_device(op, mask, "mask", h, "h")
    _check_device(op, W, "W", h, "h")
    if v is not None:
        _check_device(op, v, "v", h, "h")


def check_label_attention_shortlist_inputs(h: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                                           v: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError, as the compiled op does, unless the shapes, dtypes and devices of a
    label_attention_shortlist input are valid: label_attention's checks, then labels [B,K] int64 on h's
    device (the values follow in check_label_attention_shortlist_values)."""
    op = "label_attention_shortlist"
    check_label_attention_inputs(h, mask, W, v, op)
    if labels.dim() != 2 or labels.shape[0] != h.shape[0]:
        raise ValueError(f"{op}: labels must be [B,K] with B = {h.shape[0]}, got {_shape(labels)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be int64, got {_dtype(labels)}")
    _check_device(op, labels, "labels", h, "h")


def check_label_attention_shortlist_values(labels: torch.Tensor, L: int) -> None:
    """Raise ValueError, as the compiled op does, unless every label id is in [-1, L) (-1: padding)."""
    if labels.numel() and (bool((labels < -1).any()) or bool((labels >= L).any())):
        raise ValueError(f"label_attention_shortlist: labels must be in [-1, L={L}) (-1: padding)")


def check_layer_sum_inputs(xs: Sequence[torch.Tensor], w: torch.Tensor, op: str = "layer_sum") -> None:
    """Raise ValueError, as the compiled op does, unless (xs, w) is a valid layer_sum input."""
    K = len(xs)
    if K < 1:
        raise ValueError(f"{op}: expected at least one input tensor")
    if w.dim() != 1 or w.shape[0] != K:
        raise ValueError(f"{op}: expected w of shape [K] = [{K}], got {_shape(w)}")
    x0 = xs[0]
    if x0.dtype not in _KERNEL_FLOATS:
        raise ValueError(f"{op}: inputs must be float32, float64, bfloat16 or float16, got {_dtype(x0)}")
    if w.dtype not in (torch.float32, x0.dtype):
        raise ValueError(f"{op}: w must be float32 or the inputs' dtype ({_dtype(x0)}), got {_dtype(w)}")
    for i, x in enumerate(xs[1:], start=1):
        if x.shape != x0.shape:
            raise ValueError(f"{op}: all inputs must have one shape; input {i} has {_shape(x)}, "
                             f"input 0 has {_shape(x0)}")
        if x.dtype != x0.dtype:
            raise ValueError(f"{op}: all inputs must have one dtype; input {i} is {_dtype(x)}, input 0 is {_dtype(x0)}")
        _check_device(op, x, f"input {i}", x0, "input 0")
    _check_device(op, w, "w", x0, "input 0")


def check_topk_metrics_inputs(scores: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, k: int,
                              inv_prop: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError, as the compiled op does, unless the shapes, dtypes and devices of a topk_metrics
    input are valid (the checks of its values follow in topk_metrics_reference, in the kernels' order)."""
    op = "topk_metrics"
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be [R, L], got shape {_shape(scores)}")
    if scores.dtype not in _KERNEL_FLOATS:
        raise ValueError(f"{op}: scores must be float32, float64, bfloat16 or float16, got {_dtype(scores)}")
    R, L = scores.shape
    if not 1 <= k <= L:
        raise ValueError(f"{op}: k must be in [1, L={L}], got {k}")

    def truth_device(t, name):
        if t.device.type != "cpu" and t.device != scores.device:
            raise ValueError(f"{op}: {name} is on {t.device} but must be on the CPU or on scores' device "
                             f"({scores.device})")

    for t, name in ((indptr, "indptr"), (indices, "indices")):
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {_shape(t)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: {name} must be int64 or int32, got {_dtype(t)}")
        truth_device(t, name)
    if indptr.numel() != R + 1:
        raise ValueError(f"{op}: indptr must have R+1 = {R + 1} entries, has {indptr.numel()}")
    if inv_prop is not None:
        if inv_prop.dim() != 1 or not inv_prop.is_floating_point():
            raise ValueError(f"{op}: inv_prop must be a 1-D floating tensor, got {_dtype(inv_prop)} of shape "
                             f"{_shape(inv_prop)}")
        if inv_prop.numel() < L:
            raise ValueError(f"{op}: inv_prop must have at least L = {L} entries, has {inv_prop.numel()}")
        truth_device(inv_prop, "inv_prop")


def check_relu_dropout_dot_inputs(x: torch.Tensor, w: torch.Tensor, p: float, op: str = "relu_dropout_dot") -> None:
    """Raise ValueError, as the compiled op does, unless (x, w, p) is a valid relu_dropout_dot input (the
    seed, drawn by ops.relu_dropout_dot itself, is always valid)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: p must be in [0, 1), got {p:g}")
    if x.dtype not in _KERNEL_FLOATS:
        raise ValueError(f"{op}: x must be float32, float64, bfloat16 or float16, got {_dtype(x)}")
    if x.dim() < 1 or w.dim() != 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: w must be [H] with H = x's last size ({x.shape[-1] if x.dim() else 0}), "
                         f"got {_shape(w)}")
    if w.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"{op}: w must be float32 or x's dtype ({_dtype(x)}), got {_dtype(w)}")
    _check_device(op, w, "w", x, "x")
