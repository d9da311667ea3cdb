from reparam.core import opmath
from reparam.core.ops import AvgPool, Conv, Sum
from reparam.core.pattern import P, X
from reparam.core.rule import require, rule
from reparam.core.terms import affine_source


def _beside_conv(pool) -> bool:
    """The pool is (through at most one affine) a branch of a sum that also holds a conv of its input
    (or, when a conv read only by the pool feeds it, of that conv's input: DBB's 1×1 → avg branch)."""
    sources = {pool.inputs[0].id}
    feeder = pool.inputs[0]
    if isinstance(feeder.op, Conv) and len(feeder.users) == 1:
        sources.add(feeder.inputs[0].id)
    for user in pool.users:
        branch = user if not isinstance(user.op, Sum) else pool
        total = user if isinstance(user.op, Sum) else next((u for u in user.users if isinstance(u.op, Sum)), None)
        if total is None or (branch is not pool and affine_source(branch)[0] is not pool):
            continue
        if any(isinstance(n.op, Conv) and n.inputs[0].id in sources for n in total.inputs):
            return True
    return False


@rule(P(AvgPool, X("x"), name="pool"))
def avgpool_to_conv(x, pool):
    """AvgPool(k, s, p)(x) = depthwise conv(x) with weights 1/∏k, stride s, padding p (DBB avg branch).

    Exact when count_include_pad is on (or p = 0) and ceil_mode is off. Fires only where a conv
    follows (serial merge) or sits beside it in a sum, since a lone pool is cheaper as a pool.
    """
    op = pool.op
    require(not op.ceil_mode, "ceil_mode changes the output size")
    require(op.count_include_pad or not any(op.padding), "count_include_pad=False divides borders differently")
    require(x.channels is not None, "the channel count is unknown (pass example inputs)")
    feeds_conv = len(pool.users) == 1 and isinstance(pool.users[0].op, Conv)
    if not (feeds_conv or _beside_conv(pool)):
        return None
    return opmath.avgpool_conv(op, x.channels, op)(x)
