from reparam.core import opmath
from reparam.core.ops import Linear
from reparam.core.pattern import Many, P, SumOf, X
from reparam.core.rule import rule
from reparam.core.terms import merged


@rule(SumOf(Many(P(Linear, X("x"), one_use=True), min=2, alike=lambda n: tuple(n.op.weight.shape), name="heads")),
      phase="merge")
def linear_sum(total, x, heads, rest):
    """Σ cᵢ·linearᵢ(x) = linear(x) with W = Σ cᵢWᵢ, b = Σ cᵢbᵢ (averaged or weighted heads).

    Exact always, for Linears of the same input with the same output size.
    """
    one = opmath.merge_linear([t.node.op for t in heads], [t.coeff for t in heads])
    return merged(total, heads, one(x))
