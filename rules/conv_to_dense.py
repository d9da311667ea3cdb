from __future__ import annotations

import math

from reparam.core.ops import Conv, Flatten, Linear, Permute, Sum, as_float64
from reparam.core.pattern import P
from reparam.core.rule import require, rule
from reparam.core.terms import rebuild
from reparam.math import kernels
from reparam.rules.reshape import Reshape

MAX_ELEMENTS = 1 << 24  # largest dense matrix (and identity basis) a conv is written as: 128 MiB in float64
_VIEWS = (Reshape, Flatten)  # ops that move no value: element f of the flattened input is element f of the output


def _below_views(n):
    """(the node under a chain of views ending at ``n``, the views from it up to ``n``)."""
    chain = []
    while isinstance(n.op, _VIEWS):
        chain.append(n)
        n = n.inputs[0]
    return n, chain[::-1]


def _base(n):
    return _below_views(n)[0]


def _fc_form(n):
    """(rows, in, out) of a Linear, or of a 1×1 conv on a 1×1 input (a grouped FC on (N, D, 1, 1)); else None."""
    z = n.inputs[0] if n.inputs else None
    if z is None or z.shape is None or n.shape is None:
        return None
    if isinstance(n.op, Linear):
        return math.prod(z.shape[:-1]), n.op.in_features, n.op.out_features
    if isinstance(n.op, Conv) and n.op.nd and all(s == 1 for s in z.shape[2:]) and set(n.op.kernel_size) == {1} \
            and not n.op.is_padded:
        return z.shape[0], n.op.in_channels, n.op.out_channels
    return None


def _fixed_sample(n) -> bool:
    """True when the model fixes n's shape past its leading axis: it is a Reshape to fixed sizes, or a view or a
    permute that keeps the leading axis first, of such a tensor."""
    while True:
        if isinstance(n.op, Reshape):
            return True
        if not (isinstance(n.op, Flatten) or (isinstance(n.op, Permute) and n.op.dims[0] == 0)):
            return False
        n = n.inputs[0]


def _single_use(chain) -> bool:
    return all(len(v.users) == 1 for v in chain)


@rule(P(Sum, name="total"), phase="merge")
def conv_to_dense(total):
    """FC(x̄) + conv(x) = FC'(x̄), W' = W + M, b' = b + m: a conv beside an FC over its input flattened is a matrix.

    The FC is a Linear, or a 1×1 conv on (N, D, 1, 1) (a grouped FC); x̄ is x flattened per sample. M is the conv's
    matrix on the flattened sample: the conv applied to the identity basis of C·∏spatial in float64 (its zero
    padding included); m is its bias repeated over the output positions (RepMLP: local conv branches merged into
    the FC). The FC keeps its groups when M is zero across them, else becomes dense.

    Exact when: the FC's input and the conv's input are views (reshape/flatten, which move no value) of one tensor
    with equal rows (the FC's rows are the conv's samples, so the FC's features are the sample flattened in the
    conv's own C, H, W order); both terms are views of the FC's and the conv's outputs with the sum's shape and
    equal rows, the FC's out-features the conv's C'·∏spatial'; and the conv's input size is fixed by the model
    (it is a reshape to fixed sizes, or a flatten or batch-first permute of one; or the conv is unstrided and its
    output has the fixed shape of the reshaped FC output it is added to): the FC's weight alone fixes only C·H·W.
    Refused above MAX_ELEMENTS (2²⁴) entries of M or of the basis, so a big feature map never allocates gigabytes.
    """
    terms = list(zip(range(len(total.inputs)), total.inputs, total.op.coeffs))
    fcs, convs = [], []
    for k, t, c in terms:
        if t.shape != total.shape or len(t.users) != 1:
            continue
        core, outer = _below_views(t)
        if not _single_use([core] + outer):
            continue
        form = _fc_form(core)
        if form is not None:
            fcs.append((k, core, outer, c, form))
        elif isinstance(core.op, Conv):
            convs.append((k, core, outer, c))
    if not fcs or not convs:
        return None
    for k, fc, fc_outer, c_fc, (rows, d_in, d_out) in fcs:
        z = fc.inputs[0]
        mine = [cv for cv in convs if cv[1].inputs[0] is not z and _base(cv[1].inputs[0]) is _base(z)]
        if not mine:
            others = sorted({_base(cv[1].inputs[0]).name for cv in convs})
            require(False, f"no conv of the sum reads the tensor the FC '{fc.name}' flattens ('{_base(z).name}'); "
                           f"the convs read {', '.join(repr(o) for o in others)}")
        W, b = _dense_weight(fc)
        W, b = c_fc * W, c_fc * b
        for _, conv, conv_outer, c_conv in mine:
            y = conv.inputs[0]
            require(y.shape is not None and conv.shape is not None, "the conv's shapes are unknown (pass example inputs)")
            require(y.shape[0] == rows, f"the FC '{fc.name}' has {rows} rows, the conv '{conv.name}' {y.shape[0]} samples: "
                                        f"its features are not one sample of the conv's input")
            require(math.prod(y.shape[1:]) == d_in and math.prod(conv.shape[1:]) == d_out and conv.shape[0] == rows,
                    f"the conv '{conv.name}' maps {tuple(y.shape[1:])} → {tuple(conv.shape[1:])}, the FC {d_in} → {d_out}")
            pinned = _fixed_sample(y) or (not conv_outer and fc_outer and isinstance(fc_outer[-1].op, Reshape)
                                          and all(s == 1 for s in conv.op.stride))
            require(pinned, f"the input size of the conv '{conv.name}' is not fixed by the model (the FC's weight fixes "
                            f"only C·H·W = {d_in}): reshape its input to fixed sizes")
            require(d_in * max(d_in, d_out) <= MAX_ELEMENTS,  # the identity basis is d_in × d_in
                    f"the conv '{conv.name}' as a dense matrix would have {d_in}×{d_out} entries (from a basis of "
                    f"{d_in}×{d_in}), above the limit of {MAX_ELEMENTS}")
            op = conv.op
            M, m = kernels.conv_matrix(as_float64(op.weight), as_float64(op.bias), tuple(y.shape[1:]), op.stride,
                                       op.padding, op.dilation, op.groups, op.padding_mode)
            W, b = W + c_conv * M, b + c_conv * m
        base, inner = _below_views(z)  # the FC reads the views anew from their base, which the convs read too
        new = base
        for v in inner + [fc]:
            new = (_with_dense(fc.op, W, b) if v is fc else v.op)(new)
        for v in fc_outer:
            new = v.op(new)
        return rebuild(total, {k: (new, 1.0)}, {cv[0] for cv in mine})
    return None


def _dense_weight(fc):
    """The FC's weight as a dense (out, in) float64 matrix and its bias (zeros if none)."""
    op = fc.op
    W = as_float64(op.weight)
    if isinstance(op, Conv):
        W = W.reshape(W.shape[0], -1)
        if op.groups > 1:
            W = kernels.expand_groups(W[..., None], op.groups, 1)[..., 0]
    b = as_float64(op.bias)
    return W, (W.new_zeros(W.shape[0]) if b is None else b)


def _with_dense(op, W, b):
    """The FC with dense weight ``W`` (out, in) and bias ``b``; a grouped 1×1 conv keeps its groups when W is zero
    off its diagonal blocks."""
    if isinstance(op, Linear):
        return op.with_(weight=W, bias=b)
    g = op.groups
    if g > 1:
        o, i = W.shape[0] // g, W.shape[1] // g
        blocks = W.reshape(g, o, g, i)
        off = blocks.clone()
        off[range(g), :, range(g), :] = 0
        if not bool(off.any()):
            Wg = blocks[range(g), :, range(g), :].reshape(W.shape[0], i)
            return op.with_(weight=Wg.reshape(W.shape[0], i, *op.kernel_size), bias=b)
    return op.with_(weight=W.reshape(*W.shape, *op.kernel_size), bias=b, groups=1)
