from reparam.core.ops import Affine, Identity, Sum
from reparam.core.pattern import P, X
from reparam.core.rule import rule


@rule(P((Identity, Affine, Sum), X("x"), name="node"), phase="canonicalize")
def identity_elim(x, node):
    """f(x) = x for Identity, eval Dropout, a one-term Sum with coefficient 1, an Affine with s=1 and t=0 (or no t).

    Exact always: the op computes x itself (for an Affine: when it neither broadcasts nor promotes x).
    """
    op = node.op
    if isinstance(op, Identity):
        return x
    if isinstance(op, Sum):
        return x if op.coeffs == (1.0,) else None
    no_shift = op.shift is None or not bool(op.shift.any())  # x + 0 (an unused branch's literal 0)
    same_type = node.dtype is None or x.dtype is None or node.dtype == x.dtype  # x + 0 may promote the dtype
    if no_shift and bool((op.scale == 1).all()) and node.shape == x.shape and same_type:
        return x
    return None
