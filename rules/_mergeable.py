"""Which sibling convs of one input parallel_sum_pad will merge once the branch normalizers have run.

groups_merge and dilated_to_dense rewrite a conv's kernel into a coarser grouping or a smaller dilation only
so that parallel_sum_pad can then merge it with a sibling; on its own the rewritten kernel is larger (block-
diagonal or densified). So they must rewrite a conv only when a sibling agrees with it on every field of
parallel_sum_pad's merge key except the ones they normalize, and is aligned with it (equal padding slack
lo + hi − (extent − 1) per axis, so the same output size for every input size: what kernels.parallel_offsets
requires). The merge key itself is parallel_sum_pad's (imported, not copied).
"""
from __future__ import annotations

from reparam.core.ops import Conv
from reparam.core.rule import require
from reparam.core.terms import Term, by_source, joins_outer_sum, rebuild, sum_terms

from reparam.rules.parallel_sum_pad import _KEY_FIELDS

# the key fields the normalizers bring to a common value (groups_merge: groups, dilated_to_dense: dilation);
# both are exempt for either rule, since a sibling may need both (a dilated depthwise conv beside a dense one)
NORMALIZED = ("groups", "dilation")
_FIXED = tuple(f for f in _KEY_FIELDS if f not in NORMALIZED)


def slack(op: Conv) -> tuple[int, ...]:
    """lo + hi − (extent − 1) per axis: convs of one input with equal stride line up iff these are equal."""
    return tuple(lo + hi - (e - 1) for (lo, hi), e in zip(op.padding, op.extent))


def _key(op: Conv) -> tuple:
    return tuple(getattr(op, f) for f in _FIXED) + (slack(op),)


def clusters(convs: list[Term]) -> list[list[Term]]:
    """The conv terms (of one source) grouped by what parallel_sum_pad will merge after normalizing
    groups and dilation, in first-seen order; only groups of at least two."""
    by_key: dict = {}
    for t in convs:
        by_key.setdefault(_key(t.node.op), []).append(t)
    return [same for same in by_key.values() if len(same) >= 2]


def apart(convs: list[Term]) -> str:
    """Why convs of one input stay apart even after normalizing: the first key field on which they differ."""
    for f in _FIXED:
        values = sorted({str(getattr(t.node.op, f)) for t in convs})
        if len(values) > 1:
            return f"they differ in {f.replace('_', ' ')} ({' vs '.join(values)})"
    values = sorted({str(slack(t.node.op)) for t in convs})
    return f"their padding slack lo + hi − (extent − 1) per axis differs ({' vs '.join(values)}), so their " \
           f"output sizes differ for some input size"


def uneven_shapes(terms: list[Term]) -> str | None:
    """parallel_sum_pad refuses a whole sum whose convs of one input give different shapes (the sum
    broadcasts them); then nothing of it will merge. The reason, or None."""
    sizes: dict = {}
    for t in terms:
        if isinstance(t.node.op, Conv):
            sizes.setdefault(t.source.id, set()).add(t.node.shape)
    uneven = next((s for s in sizes.values() if len(s) > 1), None)
    if uneven is None:
        return None
    return f"convs of one input give shapes {sorted(uneven)}, which the sum broadcasts, so parallel_sum_pad " \
           f"will not merge this sum"


def normalize_siblings(total, field: str, common, rewrite, verb: str):
    """The sum ``total`` with sibling convs of one input that parallel_sum_pad will merge brought to one
    value of ``field`` (``common(values)``, applied by ``rewrite(op, value)``); None if no siblings differ
    in it. Refuses (``verb`` says what the rewrite would do) when siblings differ but will not merge."""
    if joins_outer_sum(total):  # normalized where parallel_sum_pad merges: at the root of the sum tree
        return None
    terms = sum_terms(total)
    unmerged = None
    for group in by_source(terms):
        convs = [t for t in group if isinstance(t.node.op, Conv) and len(t.node.users) == 1]
        if len({getattr(t.node.op, field) for t in convs}) < 2:
            continue
        for same in clusters(convs):
            values = {getattr(t.node.op, field) for t in same}
            if len(values) < 2:
                continue
            uneven = uneven_shapes(terms)
            require(uneven is None, f"{verb} would only enlarge the kernels: {uneven}")
            target = common(values)
            changed = {t.index: (rewrite(t.node.op, target)(t.source), t.coeff)
                       for t in same if getattr(t.node.op, field) != target}
            return rebuild(total, changed)
        values = " vs ".join(map(str, sorted({getattr(t.node.op, field) for t in convs})))
        unmerged = unmerged or (f"sibling convs of one input differ in {field} ({values}), but parallel_sum_pad "
                                f"cannot merge them: {apart(convs)}; {verb} would only enlarge the kernels")
    require(unmerged is None, unmerged or "")
    return None
