"""The shared condition of the branch normalizers (groups_merge, dilated_to_dense): sibling convs of one input
are rewritten to a common grouping or dilation only when they then agree on everything else a parallel sum of
convs needs (terms.merge_key: stride, padding mode, channels, …) and line up (equal padding slack per axis,
terms.slack): on its own, the rewritten kernel is larger (block-diagonal or densified).
"""
from __future__ import annotations

from reparam.core.ops import Conv
from reparam.core.pattern import Many, P, SumOf, X
from reparam.core.rule import require
from reparam.core.terms import MERGE_FIELDS, merge_key, rebuild, slack

# the key fields the normalizers bring to a common value (groups_merge: groups, dilation_to_dense: dilation);
# both are exempt for either rule, since a sibling may need both (a dilated depthwise conv beside a dense one)
NORMALIZED = ("groups", "dilation")
_FIXED = tuple(f for f in MERGE_FIELDS if f not in NORMALIZED)

# a sum with at least two convs of one input that nothing else reads
SIBLINGS = SumOf(Many(P(Conv, X("x"), one_use=True), min=2, name="convs"))


def _key(op: Conv) -> tuple:
    return merge_key(op, NORMALIZED) + (slack(op),)


def clusters(convs) -> list[list]:
    """The conv terms (of one source) that agree on every merge field but the normalized ones and line up, in
    first-seen order; only groups of at least two."""
    by_key: dict = {}
    for t in convs:
        by_key.setdefault(_key(t.node.op), []).append(t)
    return [same for same in by_key.values() if len(same) >= 2]


def apart(convs) -> str:
    """Why convs of one input stay apart even after normalizing: the first key field on which they differ."""
    for f in _FIXED:
        values = sorted({str(getattr(t.node.op, f)) for t in convs})
        if len(values) > 1:
            return f"they differ in {f.replace('_', ' ')} ({' vs '.join(values)})"
    values = sorted({str(slack(t.node.op)) for t in convs})
    return f"their padding slack lo + hi − (extent − 1) per axis differs ({' vs '.join(values)}), so their " \
           f"output sizes differ for some input size"


def normalize_siblings(total, x, convs, field: str, common, rewrite, verb: str):
    """The sum ``total`` with the sibling convs of ``x`` that would then be summable brought to one value of
    ``field`` (``common(values)``, applied by ``rewrite(op, value)``); None if they do not differ in it. Refuses
    (``verb`` says what the rewrite would do) when they differ but would stay apart."""
    if len({getattr(t.node.op, field) for t in convs}) < 2:
        return None
    for same in clusters(convs):
        values = {getattr(t.node.op, field) for t in same}
        if len(values) < 2:
            continue
        shapes = {n.shape for n in total.inputs if isinstance(n.op, Conv) and n.inputs[0] is x}
        require(len(shapes) == 1, f"{verb} would only enlarge the kernels: convs of one input give shapes "
                f"{sorted(shapes)}, which the sum broadcasts, so parallel_sum_pad will not merge this sum")
        target = common(values)
        changed = {t.index: (rewrite(t.node.op, target)(x), t.coeff) for t in same
                   if getattr(t.node.op, field) != target}
        return rebuild(total, changed)
    values = " vs ".join(map(str, sorted({getattr(t.node.op, field) for t in convs})))
    require(False, f"sibling convs of one input differ in {field} ({values}), but parallel_sum_pad cannot merge "
            f"them: {apart(convs)}; {verb} would only enlarge the kernels")
