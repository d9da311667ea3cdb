from reparam.core import opmath
from reparam.core.ops import Conv, Sum
from reparam.core.pattern import P
from reparam.core.rule import require, rule
from reparam.core.terms import by_source, joins_outer_sum, rebuild, sum_terms


_KEY_FIELDS = ("nd", "stride", "dilation", "groups", "padding_mode", "in_channels", "out_channels")


def _key(op: Conv):
    return tuple(getattr(op, f) for f in _KEY_FIELDS)


def _difference(convs) -> str:
    """Why sibling convs of one input cannot merge: the first key field on which they differ (groups and
    dilation last: groups_merge and dilated_to_dense bring those to a common value when nothing else differs)."""
    for f in sorted(_KEY_FIELDS, key=lambda f: f in ("groups", "dilation")):
        values = sorted({str(getattr(t.node.op, f)) for t in convs})
        if len(values) > 1:
            return f"sibling convs of one input differ in {f.replace('_', ' ')} ({' vs '.join(values)})"
    return "sibling convs of one input cannot merge"


@rule(P(Sum, name="total"))
def parallel_sum_pad(total):
    """Σ cᵢ·convᵢ(x) = conv(x): kernels zero-padded to the union footprint and summed, biases summed.

    Exact when the convs read the same x with equal stride, dilation, groups, channels and padding
    mode, and their kernels line up: per axis, equal slack lo + hi − (extent − 1), so equal output
    sizes for every input size (checked by kernels.parallel_offsets). Covers asymmetric
    kernels (1×k, k×1, 5×3), explicit F.pad alignment (after pad_fold), subtraction and scalar weights.
    """
    if joins_outer_sum(total):  # merge once, at the root of the sum tree
        return None
    terms = sum_terms(total)
    sizes = {}
    for t in terms:
        if isinstance(t.node.op, Conv):
            sizes.setdefault(t.source.id, set()).add(t.node.shape)
    uneven = next((s for s in sizes.values() if len(s) > 1), None)
    require(uneven is None, f"branches are misaligned: convs of one input give shapes {sorted(uneven or [])}, "
            f"which the sum broadcasts")
    unmerged = None
    for group in by_source(terms):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        by_key: dict = {}
        for t in convs:
            by_key.setdefault(_key(t.node.op), []).append(t)
        if len(by_key) > 1 and all(len(same) < 2 for same in by_key.values()):
            unmerged = unmerged or _difference(convs)
        for same in by_key.values():
            if len(same) < 2:
                continue
            try:
                merged = opmath.merge_parallel([t.node.op for t in same], [t.coeff for t in same])
            except ValueError as err:
                require(False, f"branches are misaligned: {err}")
            first = same[0]
            return rebuild(total, {first.index: (merged(first.source), 1.0)}, {t.index for t in same[1:]})
    require(unmerged is None, unmerged or "")
    return None
