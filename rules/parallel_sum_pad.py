from reparam.core import opmath
from reparam.core.ops import Conv
from reparam.core.pattern import Many, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.core.terms import MERGE_FIELDS, merge_key, merged


def _difference(convs) -> str:
    """Why sibling convs of one input cannot merge: the first key field on which they differ (groups and
    dilation last: groups_merge and dilated_to_dense bring those to a common value when nothing else differs)."""
    for f in sorted(MERGE_FIELDS, key=lambda f: f in ("groups", "dilation")):
        values = sorted({str(getattr(t.node.op, f)) for t in convs})
        if len(values) > 1:
            return f"sibling convs of one input differ in {f.replace('_', ' ')} ({' vs '.join(values)})"
    return "sibling convs of one input cannot merge"


def uneven_shapes(total, x) -> set | None:
    """The output shapes of the convs of ``x`` in the sum ``total`` (broadcast terms included), when they differ."""
    shapes = {n.shape for n in total.inputs if isinstance(n.op, Conv) and n.inputs[0] is x}
    return shapes if len(shapes) > 1 else None


# broadcast terms too: a conv of x whose output the sum broadcasts is a reason to refuse, not to look away
@rule(SumOf(Many(P(Conv, X("x"), one_use=True), min=2, name="convs"), broadcast=True), phase="merge")
def parallel_sum_pad(total, x, convs, rest):
    """Σ cᵢ·convᵢ(x) = conv(x): kernels zero-padded to the union footprint and summed, biases summed.

    Exact when the convs read the same x with equal stride, dilation, groups, channels and padding
    mode, and their kernels line up: per axis, equal slack lo + hi − (extent − 1), so equal output
    sizes for every input size (checked by kernels.parallel_offsets). Covers asymmetric
    kernels (1×k, k×1, 5×3), explicit F.pad alignment (after pad_fold), subtraction and scalar weights.
    """
    uneven = uneven_shapes(total, x)
    require(uneven is None, f"branches are misaligned: convs of one input give shapes {sorted(uneven or [])}, "
            f"which the sum broadcasts")
    by_key: dict = {}
    for t in convs:
        by_key.setdefault(merge_key(t.node.op), []).append(t)
    same = next((same for same in by_key.values() if len(same) >= 2), None)
    require(same is not None, _difference(convs))
    try:
        one = opmath.merge_parallel([t.node.op for t in same], [t.coeff for t in same])
    except ValueError as err:
        require(False, f"branches are misaligned: {err}")
    return merged(total, same, one(x))
