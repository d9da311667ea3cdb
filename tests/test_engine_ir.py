"""The engine and the pattern language on IR built directly (reparam.core.ir), no torch model: order-free sum
terms, use constraints, phases as precedence, the local check, and the caller's torch state left as it was."""
from __future__ import annotations

import itertools

import pytest
import torch

from reparam.core.engine import Engine
from reparam.core.ir import Graph, Node
from reparam.core.ops import Affine, Conv, Input, Sum
from reparam.core.pattern import Each, Many, One, P, SumOf, X
from reparam.core.rule import require, rule
from reparam.frontends.rulesets import builtin_rules, select_rules

SHAPE = (1, 4, 6, 6)


def conv_op(k: int = 3, seed: int = 0) -> Conv:
    g = torch.Generator().manual_seed(seed)
    return Conv(torch.randn(4, 4, k, k, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                dtype=torch.float64), (1, 1), ((k // 2, k // 2),) * 2, (1, 1))


def bn_op(seed: int = 0) -> Affine:
    g = torch.Generator().manual_seed(seed)
    return Affine(torch.rand(4, generator=g, dtype=torch.float64) + 0.5, torch.randn(4, generator=g,
                  dtype=torch.float64), 1)


def graph_of(build) -> tuple[Graph, Node]:
    """A graph with one input x of SHAPE; ``build(add, x)`` returns the output node."""
    g = Graph()

    def add(op, *inputs, name=""):
        return g.add(Node(op, inputs, name=name or type(op).__name__.lower(), shape=SHAPE, dtype=torch.float64))

    x = add(Input(0), name="x")
    g.outputs = [build(add, x)]
    return g, x


def branches(add, x, order):
    """conv3(x)·BN, conv1(x), BN(x), summed in ``order``."""
    made = [add(bn_op(1), add(conv_op(3, 1), x)), add(conv_op(1, 2), x), add(bn_op(3), x)]
    return add(Sum((1.0,) * 3), *[made[k] for k in order])


def test_sum_of_matches_terms_in_any_order_and_binds_the_rest():
    pattern = SumOf(Many(P(Conv, X("x")), min=2, name="convs"))
    for order in itertools.permutations(range(3)):
        g, x = graph_of(lambda add, x: add(Sum((1.0, 1.0, 1.0)), *[[add(conv_op(3), x), add(conv_op(1), x),
                                                                      add(bn_op(), x)][k] for k in order]))
        m = pattern(g.outputs[0])
        assert m is not None and m["x"] is x
        assert sorted(type(t.node.op).__name__ for t in m["convs"]) == ["Conv", "Conv"]
        assert [type(t.node.op).__name__ for t in m["rest"]] == ["Affine"]


def test_sum_of_tries_each_source():
    """Two convs of y and one of x: Many(min=2) binds the pair of y, whatever comes first."""
    g, x = graph_of(lambda add, x: (lambda y: add(Sum((1.0, 1.0, 1.0)), add(conv_op(), x), add(conv_op(), y),
                                                   add(conv_op(1), y)))(add(bn_op(), x, name="y")))
    y = next(n for n in g.nodes if n.name == "y")
    matches = list(SumOf(Many(P(Conv, X("s")), min=2, name="convs")).all(g.outputs[0]))
    assert [m["s"] for m in matches] == [y]


def test_one_use_is_part_of_the_match():
    g, x = graph_of(lambda add, x: (lambda c: add(Sum((1.0, 1.0)), c, add(bn_op(), c)))(add(conv_op(), x)))
    assert P(Affine, P(Conv, X(), one_use=True))(g.outputs[0].inputs[1]) is None  # the conv has two consumers
    assert P(Affine, P(Conv, X()))(g.outputs[0].inputs[1]) is not None
    assert P(Sum, Each(X(one_use=True)))(g.outputs[0]) is None
    assert P(Affine, P(Conv, X(), only_used_by=(Sum, Affine)))(g.outputs[0].inputs[1]) is not None
    assert P(Affine, P(Conv, X(), only_used_by=Affine))(g.outputs[0].inputs[1]) is None


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_builtin_rules_reach_one_conv_in_every_term_order(order):
    g, _ = graph_of(lambda add, x: branches(add, x, order))
    Engine(builtin_rules()).run(g)
    kinds = sorted(type(n.op).__name__ for n in g.nodes)
    assert kinds == ["Conv", "Input"], kinds


def test_an_earlier_phase_acts_first_whatever_the_list_order():
    """A fold rule listed after a merge rule still rewrites first: phases, not list order, give precedence."""
    seen = []

    @rule(SumOf(Many(P(Conv, X("x")), min=1, name="convs")), phase="merge")
    def look(total, x, convs, rest):
        """Σ = Σ (records what it sees)."""
        seen.append(sorted(type(t.node.op).__name__ for t in convs + rest))
        return None

    fold = next(r for r in builtin_rules() if r.name == "conv_bn_fold")
    g, _ = graph_of(lambda add, x: branches(add, x, (0, 1, 2)))
    Engine([look, fold]).run(g)
    assert seen and seen[0] == ["Affine", "Conv", "Conv"]  # conv·BN already folded: two convs and the BN(x)


def test_refusals_name_the_matched_terms():
    @rule(SumOf(One(P(Conv, X("x")), name="t")), phase="merge")
    def never(total, x, t, rest):
        """Σ = Σ (always refuses)."""
        require(False, "no")

    g, _ = graph_of(lambda add, x: branches(add, x, (0, 1, 2)))
    log = Engine([never], check=False).run(g)
    assert log.refusals() and all(e.rule == "never" and e.detail == "no" for e in log.refusals())


def test_the_callers_torch_threads_are_restored_on_every_path():
    before = torch.get_num_threads()
    g, _ = graph_of(lambda add, x: branches(add, x, (0, 1, 2)))
    engine = Engine(builtin_rules())
    engine.run(g, wait=False)
    assert torch.get_num_threads() == before
    engine.wait()

    @rule(P(Affine, X("x"), name="a"))
    def crash(x, a):
        """a(x) = ? (crashes)."""
        raise KeyError("boom")

    g, _ = graph_of(lambda add, x: branches(add, x, (0, 1, 2)))
    with pytest.raises(Exception):
        Engine([crash]).run(g)
    assert torch.get_num_threads() == before


def test_phase_names_select_rules():
    folds = {r.name for r in builtin_rules() if r.phase == "fold"}
    assert {r.name for r in select_rules(only=["fold"])} == folds
    assert not folds & {r.name for r in select_rules(disable=["fold"])}
