from reparam.core import opmath
from reparam.core.ops import Affine, AvgPool, Conv
from reparam.core.pattern import One, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.core.terms import rebuild

# a pool whose only consumer is a conv (then the two compose: serial_merge)
_FEEDS_CONV = P(AvgPool, X("x"), name="pool", one_use=True, only_used_by=Conv)
# a pool of x (or of a conv of x that only the pool reads: DBB's 1×1 → avg branch), maybe under an affine,
# as a term of a sum that also holds a conv of x
_POOL = P(AvgPool, X("src"), name="pool", one_use=True) | \
    P(AvgPool, P(Conv, X("src"), one_use=True), name="pool", one_use=True)
_BRANCH = _POOL | P(Affine, _POOL, name="bn", one_use=True)
_BESIDE_CONV = SumOf(P(Conv, X("src")), One(_BRANCH, name="term"))


@rule(_FEEDS_CONV | _BESIDE_CONV, phase="normalize")
def avgpool_to_conv(pool, x=None, total=None, term=None, bn=None, src=None, rest=None):
    """AvgPool(k, s, p)(x) = depthwise conv(x) with weights 1/∏k, stride s, padding p (DBB avg branch).

    Exact when count_include_pad is on (or p = 0) and ceil_mode is off. Fires only where a conv
    follows (serial merge) or sits beside it in a sum, since a lone pool is cheaper as a pool.
    """
    op = pool.op
    x = pool.inputs[0]
    require(not op.ceil_mode, "ceil_mode changes the output size")
    require(op.count_include_pad or not any(op.padding), "count_include_pad=False divides borders differently")
    require(x.channels is not None, "the channel count is unknown (pass example inputs)")
    conv = opmath.avgpool_conv(op, x.channels, op)(x)
    if total is None:
        return conv
    return rebuild(total, {term.index: (conv if bn is None else bn.op(conv), term.coeff)})
