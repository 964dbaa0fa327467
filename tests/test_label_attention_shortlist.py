"""label_attention_shortlist on every device against its reference, and the reference against
label_attention's: ctx[b,k] is the dense context of label labels[b,k], zeros at padding ids (-1)."""
import pytest
import torch

from xmcnas_fast import ops

from _kernels import close
from test_label_attention import make_inputs


def make_labels(B, K, L, seed=0, padding=True):
    """labels [B,K] int64: random ids in [0, L) with a duplicate in row 0 and, when padding, -1 at the end
    of row 0 and in the middle of the last row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, L, (B, K), generator=g)
    if K > 1:
        labels[0, 1] = labels[0, 0]
    if padding and K > 1:
        labels[0, -1] = -1
        labels[-1, K // 2] = -1
    return labels


def dense_gathered(h, mask, W, labels, v):
    """The oracle's oracle: label_attention_reference over all L labels, then each row's labels picked."""
    ctx = ops.label_attention_reference(h, mask, W, v)                      # [B, L, Dv]
    picked = torch.gather(ctx, 1, labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, ctx.shape[2]))
    return picked * (labels >= 0).unsqueeze(-1)


@pytest.mark.parametrize("Dv", [None, 6])
def test_reference_is_the_dense_op_gathered(Dv):
    h, mask, W, v = make_inputs(4, 9, 8, 13, Dv=Dv, dtype=torch.float64, empty_rows=[2])
    labels = make_labels(4, 20, 13)                                          # K > L, duplicates, padding
    close(ops.label_attention_shortlist_reference(h, mask, W, labels, v), dense_gathered(h, mask, W, labels, v),
          1e-12, "ctx")


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_reference_gradient_of_W_only_in_rows_used(sparse_grad):
    h, mask, W, v = make_inputs(3, 7, 5, 40, dtype=torch.float64)
    labels = make_labels(3, 4, 40)
    W = W.requires_grad_()
    ops.label_attention_shortlist_reference(h, mask, W, labels, v, sparse_grad=sparse_grad).square().sum().backward()
    assert W.grad.layout == (torch.sparse_coo if sparse_grad else torch.strided)
    g = W.grad.to_dense()
    unused = torch.ones(40, dtype=torch.bool)
    unused[labels[labels >= 0]] = False
    assert (g[unused] == 0).all() and (g[~unused].abs().sum(1) > 0).all()
