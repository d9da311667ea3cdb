"""The engine: match → guard → rewrite, to a fixpoint, every rewrite checked on random float64 inputs.

It owns what every rule needs and no rule should repeat: the outside-consumer check (a value the
rewrite would absorb must not be used anywhere else), never editing a node or parameter in place (a
rewrite builds new nodes; the old ones die only when unused), the local numerical check, the
iteration guard, and the log of what fired and what refused and why.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from reparam.core import checks
from reparam.errors import FixpointError, ReparamError, RuleError
from reparam.core.expr import Expr
from reparam.core.ir import Graph, Node
from reparam.core.ops import Identity, Input, Opaque, output_shape
from reparam.core.pattern import bound_nodes
from reparam.core.rule import PHASES, Refusal, Rule


@dataclass
class Event:
    kind: str  # "fired" or "refused"
    rule: str
    where: str
    detail: str = ""
    match: tuple[Node, ...] = field(default=(), repr=False, compare=False)  # a refusal's matched nodes


@dataclass
class RewriteLog:
    events: list[Event] = field(default_factory=list)
    _seen_refusals: set = field(default_factory=set)

    def fired(self, rule: Rule, where: str, detail: str):
        self.events.append(Event("fired", rule.name, where, detail))

    def refused(self, rule: Rule, node: Node, reason: str, bound: dict[str, Node]):
        key = (rule.name, node.id, reason)
        if key not in self._seen_refusals:
            self._seen_refusals.add(key)
            self.events.append(Event("refused", rule.name, node.name, reason, (node, *bound_nodes(bound))))

    def fired_events(self):
        return [e for e in self.events if e.kind == "fired"]

    def refusals(self):
        """Refusals of matches whose nodes are all still in the graph: where a later rewrite replaced one of
        them, the nodes around it were revisited (a refusal that still holds was logged again), so the one
        logged before is moot. One per place and reason."""
        seen, out = set(), []
        for e in self.events:
            key = (e.rule, e.where, e.detail)
            if e.kind == "refused" and all(n.graph is not None for n in e.match) and key not in seen:
                seen.add(key)
                out.append(e)
        return out


def common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names if n]
    if not parts:
        return ""
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def absorbed_nodes(root: Node, leaves: list[Node]) -> list[Node]:
    """The old nodes a rewrite of ``root`` in terms of ``leaves`` makes redundant (root included)."""
    leaf_ids = {n.id for n in leaves}
    seen: dict[int, Node] = {}
    stack = [root]
    while stack:
        n = stack.pop()
        if n.id in seen or n.id in leaf_ids or isinstance(n.op, (Input, Opaque)):
            continue
        seen[n.id] = n
        stack.extend(n.inputs)
    return list(seen.values())


class Engine:
    """Applies ``rules`` to ``graph`` until none applies: phase by phase (see :meth:`_run`), and within a phase
    in list order at each node."""

    def __init__(self, rules: list[Rule], *, check: bool = True, max_rewrites: int | None = None,
                 stop_after: int | None = None):
        self._checks: checks.Checks | None = None
        self._by_type: dict[type, list[Rule]] = {}
        self.rules = rules
        self.check = check
        self.max_rewrites = max_rewrites
        self.stop_after = stop_after  # replay support: apply only the first N rewrites
        self.log = RewriteLog()
        self.count = 0

    def run(self, graph: Graph, wait: bool = True) -> RewriteLog:
        """Rewrite ``graph`` in place to a fixpoint. Each rewrite's local check runs on a worker thread
        while the rewriting goes on; torch runs single-threaded while the engine rewrites (the checks' tensors
        are tiny) and gets the caller's thread count back when this returns, on every path. With ``wait``
        this returns once every check has passed; otherwise call :meth:`wait` before using the result. A
        failed check raises RewriteMismatch naming its rewrite, even if a later step failed."""
        threads = torch.get_num_threads()
        self._checks = checks.Checks() if self.check else None
        torch.set_num_threads(1)
        try:
            self._run(graph)
            if self._checks is not None:
                self._checks.start()
        except Exception:
            self.wait()  # a wrong earlier rewrite explains a later failure: report it first
            raise
        except BaseException:  # interrupted: do not wait for the checks
            self.wait(cancel=True)
            raise
        finally:
            torch.set_num_threads(threads)
        if wait:
            self.wait()
        return self.log

    def wait(self, cancel: bool = False) -> None:
        """Wait for the pending local checks and raise the first failure (or drop them, with ``cancel``)."""
        pending, self._checks = self._checks, None
        if pending is not None:
            pending.close() if cancel else pending.wait()

    def phases(self) -> list[tuple[str, list[Rule]]]:
        """The rules grouped by phase, in the order of :data:`PHASES` (phases without rules left out); within
        a phase, in list order."""
        return [(p, [r for r in self.rules if r.phase == p]) for p in PHASES if any(r.phase == p for r in self.rules)]

    def _run(self, graph: Graph) -> RewriteLog:
        """One worklist per phase. The earliest phase with pending nodes acts; every node a rewrite touches is
        pending again in every phase. So no rule of a later phase sees a node an earlier phase could still
        rewrite, whatever the order the graph's nodes (a forward's branches) were written in."""
        order = graph.nodes
        limit = self.max_rewrites or 20 * len(order) + 200
        recent: collections.deque[str] = collections.deque(maxlen=200)
        phases = self.phases()
        queues = [collections.deque(order) for _ in phases]
        queued = [{n.id for n in order} for _ in phases]
        del order  # only the queues hold the nodes (a list of them all would keep every replaced op's tensors alive)
        while True:
            if self.stop_after is not None and self.count >= self.stop_after:
                break
            k = next((k for k, q in enumerate(queues) if q), None)
            if k is None:
                break
            node = queues[k].popleft()
            queued[k].discard(node.id)
            if node.graph is not graph:
                continue
            touched = self._visit(graph, node, phases[k][0], phases[k][1])
            if touched is None:
                continue
            recent.append(self.log.events[-1].rule)
            if self.count > limit:
                counts = collections.Counter(recent).most_common()
                raise FixpointError(counts[0][0], self.count, dict(counts))
            for n in touched:
                if n.graph is not graph:
                    continue
                for q, ids in zip(queues, queued):
                    if n.id not in ids:
                        q.append(n)
                        ids.add(n.id)
        return self.log

    def _rules_for(self, phase: str, rules: list[Rule], op_type: type) -> list[Rule]:
        """The rules of ``phase`` whose pattern can be rooted at an op of ``op_type`` (computed once per type)."""
        found = self._by_type.get((phase, op_type))
        if found is None:
            found = self._by_type[(phase, op_type)] = [r for r in rules if r.root_types() is None
                                                       or issubclass(op_type, r.root_types())]
        return found

    def _visit(self, graph: Graph, node: Node, phase: str, rules: list[Rule]) -> list[Node] | None:
        for rule in self._rules_for(phase, rules, type(node.op)):
            for bound in rule.matches(node):
                try:
                    expr = self._call(rule, node, bound)
                    if expr is None:
                        continue
                    if isinstance(expr, Node):  # the root is just one of its inputs
                        expr = Expr(Identity(), (expr,))
                    absorbed = absorbed_nodes(node, expr.leaves())
                    self._check_consumers(graph, node, absorbed)
                    check = self._prepare_check(rule, node, expr, absorbed) if self.check else None
                except Refusal as r:
                    self.log.refused(rule, node, str(r), bound)
                    continue
                if check is not None:
                    self._checks.submit(check)
                return self._apply(graph, rule, node, expr, absorbed)
        return None

    def _prepare_check(self, rule: Rule, node: Node, expr: Expr, absorbed: list[Node]) -> checks.Check:
        try:
            return checks.prepare(rule.name, node, expr, absorbed, seed=self.count)
        except checks.Unknown:
            raise Refusal("input shapes are unknown, so the rewrite cannot be checked (pass example inputs)")

    @staticmethod
    def _call(rule: Rule, node: Node, bound: dict[str, Node]) -> Expr | Node | None:
        """The rule's rewrite of the match; a crash or a result that is not an expression is the rule's bug."""
        try:
            expr = rule(**bound)
        except (Refusal, ReparamError):
            raise
        except Exception as err:
            raise RuleError(rule.name, node.name, f"{type(err).__name__}: {err}") from err
        if expr is not None and not isinstance(expr, (Expr, Node)):
            raise RuleError(rule.name, node.name, f"it returned a {type(expr).__name__}; a rule returns an "
                            f"expression built by calling ops on nodes (Conv(...)(x)), a node, or None")
        return expr

    @staticmethod
    def _check_consumers(graph: Graph, root: Node, absorbed: list[Node]) -> None:
        inside = {n.id for n in absorbed}
        for n in absorbed:
            if n is root:
                continue
            outside = [u for u in n.users if u.id not in inside]
            if outside or graph.is_output(n):
                who = outside[0].name if outside else "the graph output"
                raise Refusal(f"'{n.name}' is also used by '{who}', so it cannot be absorbed")

    def _apply(self, graph: Graph, rule: Rule, root: Node, expr: Expr, absorbed: list[Node]) -> list[Node]:
        # without a common prefix: the first absorbed op that holds a weight names the result (a view before it
        # would name a fused FC after itself)
        name = common_prefix([n.name for n in absorbed]) or min(
            absorbed, key=lambda n: (getattr(n.op, "weight", None) is None, n.id)).name
        new_nodes: list[Node] = []

        def build(e: Expr | Node) -> Node:
            if isinstance(e, Node):
                return e
            inputs = [build(i) for i in e.inputs]
            if isinstance(e.op, Identity) and len(inputs) == 1:
                return inputs[0]
            shape = output_shape(e.op, [i.shape for i in inputs])
            n = Node(e.op, inputs, name=name, shape=shape, dtype=root.dtype)
            new_nodes.append(n)
            return n

        out = build(expr)
        del build  # a recursive closure is a reference cycle (holding the old root and its ops' tensors)
        if out.shape is None:
            out.shape = root.shape
        graph.add_all(new_nodes)
        graph.replace_uses(root, out)
        leaves = expr.leaves()
        graph.remove_dead([root])
        self.count += 1
        self.log.fired(rule, name, f"{len(absorbed)} → {len(new_nodes)} nodes")
        touched = list(new_nodes)
        above = list(out.users)
        for _ in range(3):  # patterns reach below their root: a match rooted up to three levels up may be new
            touched.extend(above)
            above = [u for n in above for u in n.users]
        for leaf in leaves:  # and rules that look down from their root (a pool beside a conv in a sum)
            touched.append(leaf)
            touched.extend(leaf.users)
            touched.extend(leaf.inputs)
        return touched
