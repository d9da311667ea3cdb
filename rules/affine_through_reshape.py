import torch

from reparam.core.ops import Affine, Conv, Flatten, Linear
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule
from reparam.rules.reshape import Reshape


def source_index(in_shape, out_shape, axis):
    """(input axis i, r) such that output index k along ``axis`` of a reshape is (m // r) % out[axis] for every
    element at index m of input axis i, or None when no single input axis tells it."""
    so = 1
    for n in out_shape[axis + 1:]:
        so *= n
    si = 1
    for i in reversed(range(len(in_shape))):
        if so % si == 0 and in_shape[i] % ((so // si) * out_shape[axis]) == 0:
            return i, so // si
        si *= in_shape[i]
    return None


@rule(P(Affine, P(Reshape, X("y"), name="view"), name="bn"), phase="fold")
def affine_through_reshape(y, view, bn):
    """a(reshape(y)) = reshape(a'(y)): an affine on an axis of a reshape moves onto the axis of y that tells its index.

    Axis j of the reshape (or of a chain of reshapes and flattens: one reshape of y) is told by axis i of y when
    its index is (m // r) % n_j for index m of axis i (r: the stride of axis j in the output over that of axis i in
    y); then a'[m] = a[(m // r) % n_j] (RepMLP's BN over the share-sets of its FC's output reshaped to (·, S, h, w)).

    Always exact where such an axis exists (a reshape moves no value); fires only when y comes from a conv or Linear
    that nothing else reads and a' lands on its channel axis, which then absorbs it (conv_bn_fold).
    """
    views = [view]
    while isinstance(y.op, (Reshape, Flatten)) and len(y.users) == 1:  # views of views: one reshape of the first
        views.insert(0, y)
        y = y.inputs[0]
    if not isinstance(y.op, (Conv, Linear)) or len(y.users) != 1:
        return None
    a = bn.op
    if a.is_scalar:
        return _views(views, Affine(a.scale, a.shift, None, dtype=a.dtype, device=a.device)(y))
    require(y.shape is not None and view.shape is not None, "the tensor shapes are unknown (pass example inputs)")
    require(bn.shape == view.shape, "the affine broadcasts the reshaped tensor to a new shape")
    axis = a.axis % len(view.shape)
    found = source_index(y.shape, view.shape, axis)
    channels = len(y.shape) - 1 if isinstance(y.op, Linear) else 1
    require(found is not None and found[0] == channels,
            f"axis {axis} of the reshape is not a function of the {type(y.op).__name__.lower()}'s channel axis")
    i, r = found
    index = (torch.arange(y.shape[i]) // r) % view.shape[axis]

    def spread(t):
        return t if t is None or t.ndim == 0 else t.reshape(-1)[index]
    return _views(views, Affine(spread(a.scale), spread(a.shift), i, dtype=a.dtype, device=a.device)(y))


def _views(views, e):
    for v in views:
        e = v.op(e)
    return e
