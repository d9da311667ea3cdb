"""Local checks: every rewrite compared with what it replaces, on random float64 inputs.

A check is a straight-line program over the values of the rewrite's leaves: the ops of the absorbed
subgraph (giving the old value) and of the replacement (giving the new one), which must agree to 1e-9
relative to the old value's size, or to ``COMPUTATION_SHARE`` of the size of the old program's values where
they cancel (``a(x) − b(x)`` of nearly equal convs: float64 rounding of the terms alone is ~1e-16 of *their*
size, and torch's summation order, which depends on its thread count, moves it). Inputs are uniform on [−1, 1), with batch 1 (unless an op is not ``batch_free``) and spatial axes
shrunk to what the windows need.

Checks that have the same shape (one per block of a deep model, say) are run together: the program is
run once with each op's parameters laid side by side along the channel axis (a conv's groups multiplied
by their number), so every channel is computed exactly as it would be alone, and each check's error is
measured on its own channels. Checks whose ops mix channels in other ways (Linear, cat, slice) run alone.
The checks of one engine run are done by a worker thread beside the rewriting (their tensor work releases
the GIL); ``Checks.wait`` raises the first failure in the order the rewrites were applied. A queued check
keeps the ops it compares alive, so the queue is run once its tensors reach ``PENDING_BYTES`` and the
rewriting waits while twice that is held: memory stays bounded however big the model.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from dataclasses import dataclass

import torch

from reparam.errors import RewriteMismatch
from reparam.core.expr import Expr
from reparam.core.ir import Node

LOCAL_RTOL = 1e-9
COMPUTATION_SHARE = 1e-4  # a wrong rewrite still shows at 1e-13 of the computation's size
PENDING_BYTES = 1 << 27  # tensor bytes the queued checks may keep alive before they are run (128 MiB)


class Unknown(Exception):
    """The leaves' shapes are unknown, so the rewrite cannot be checked."""


@dataclass(eq=False)
class Check:
    """One rewrite's check: ``steps`` (op, argument slots) after the leaf slots; ``want``/``got`` are the
    slots of the old and the new value."""

    rule: str
    where: str
    steps: list
    shapes: list[tuple[int, ...]]
    want: int
    got: int
    seed: int

    def nbytes(self) -> int:
        """Bytes of the tensors this check's ops hold (each tensor counted once)."""
        seen: dict[int, int] = {}
        for op, _ in self.steps:
            for v in vars(op).values():
                if isinstance(v, torch.Tensor):
                    seen[id(v)] = v.numel() * v.element_size()
        return sum(seen.values())

    def inputs(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return [random_input(s, gen) for s in self.shapes]

    def signature(self) -> tuple | None:
        """What must be equal for checks to run together (None: this one runs alone)."""
        if any(len(s) < 3 for s in self.shapes):
            return None
        spatial = len(self.shapes[0]) - 2
        parts = [tuple(self.shapes), self.want, self.got]
        for op, args in self.steps:
            shape = op.check_signature(spatial)
            if shape is None:
                return None
            parts.append((shape, tuple(args)))
        return tuple(parts)

    def run(self) -> None:
        """Run alone; raises RewriteMismatch."""
        _judge(self, *_evaluate(self, self.steps, self.inputs()))


def random_input(shape, gen: torch.Generator) -> torch.Tensor:
    """Uniform on [−1, 1) in float64: as good as normal for telling linear maps apart, and 5× cheaper to draw."""
    return torch.rand(shape, generator=gen, dtype=torch.float64).mul_(2).sub_(1)


def _side_by_side(ops: list):
    """One op doing what each of ``ops`` (equal signatures) does, on their channels laid side by side."""
    return ops[0].side_by_side(ops)


def _evaluate(check: Check, steps: list, inputs: list[torch.Tensor]):
    """(old value, new value, the largest magnitude among the old program's inputs and values)."""
    values = list(inputs)
    try:
        for op, args in steps:
            values.append(op.evaluate(*[values[a] for a in args]))
    except (RuntimeError, ValueError) as err:
        raise RewriteMismatch(check.rule, check.where, f"could not evaluate the rewrite: {err}") from err
    size = max((float(v.abs().max()) for v in values[:check.want + 1]
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()), default=0.0)
    return values[check.want], values[check.got], size


def _judge(check: Check, want: torch.Tensor, got: torch.Tensor, size: float = 0.0) -> None:
    if got.shape != want.shape:
        raise RewriteMismatch(check.rule, check.where, f"shape {tuple(got.shape)} instead of {tuple(want.shape)}")
    scale = max(float(want.abs().max()) if want.numel() else 0.0, COMPUTATION_SHARE * size, 1e-30)
    err = float((got - want).abs().max()) / scale
    if not err <= LOCAL_RTOL:
        raise RewriteMismatch(check.rule, check.where, f"relative error {err:.3g} on random inputs")


def _failures_together(checks: list[Check]) -> list[tuple[int, RewriteMismatch]]:
    """Run checks of one signature as one program; the failures (index in ``checks``, error)."""
    if len(checks) > 1:
        first = checks[0]
        steps = [(_side_by_side([c.steps[k][0] for c in checks]), args) for k, (_, args) in enumerate(first.steps)]
        gen = torch.Generator().manual_seed(first.seed)  # one draw per leaf for the whole group
        inputs = [random_input((s[0], s[1] * len(checks), *s[2:]), gen) for s in first.shapes]
        try:
            want, got, size = _evaluate(first, steps, inputs)
        except RewriteMismatch:
            want = got = None  # see which one cannot run, alone
        if want is not None and got.shape == want.shape:
            return _collect((k, lambda w=w, g=g, c=c: _judge(c, w, g, size)) for k, (c, w, g) in
                            enumerate(zip(checks, want.chunk(len(checks), 1), got.chunk(len(checks), 1))))
    return _collect((k, c.run) for k, c in enumerate(checks))


def _collect(calls) -> list[tuple[int, RewriteMismatch]]:
    failures = []
    for k, call in calls:
        try:
            call()
        except RewriteMismatch as err:
            failures.append((k, err))
    return failures


def run_all(checks: list[Check], workers: int = 1) -> list[tuple[int, RewriteMismatch]]:
    """Run ``checks``, those of one signature together (groups spread over ``workers`` threads); the
    failures, with the index of each failed check."""
    groups: dict = {}
    for k, c in enumerate(checks):
        sig = c.signature()
        groups.setdefault(("alone", k) if sig is None else sig, []).append(k)

    def run(members: list[int]) -> list[tuple[int, RewriteMismatch]]:
        return [(members[j], err) for j, err in _failures_together([checks[k] for k in members])]

    if workers <= 1 or len(groups) < 2:
        return [f for members in groups.values() for f in run(members)]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="reparam-check") as pool:
        return [f for found in pool.map(run, groups.values()) for f in found]


class Checks:
    """The checks of one engine run, done by a worker thread beside the rewriting: in batches of
    ``batch`` while rewrites come in (bigger batches run more checks side by side and take the GIL less
    often), and all that are left, spread over ``workers`` threads, once the rewriting is done
    (``start``), while the caller goes on (exporting, say). ``wait`` raises the first failure in the
    order the rewrites were applied."""

    def __init__(self, batch: int = 128, workers: int | None = None, budget: int = PENDING_BYTES):
        self.batch = batch
        self.budget = budget
        self.workers = workers or max(1, min(2, torch.get_num_threads(), os.cpu_count() or 1))
        self.pending: list[tuple[int, Check]] = []
        self.pending_bytes = self.running_bytes = 0
        self.ready = threading.Condition()
        self.done = self.cancelled = False
        self.count = 0
        self.failures: list[tuple[int, RewriteMismatch]] = []
        self.thread = threading.Thread(target=self._work, name="reparam-checks", daemon=True)
        self.thread.start()

    def submit(self, check: Check) -> None:
        """Queue ``check``. A check keeps the tensors of the ops it compares alive (the absorbed ops' too)
        until it has run: once the queued checks hold ``budget`` bytes they are run at once, and the caller
        waits while twice that is held, so the memory of pending checks stays bounded."""
        size = check.nbytes()
        with self.ready:
            self.ready.wait_for(lambda: self.pending_bytes + self.running_bytes < 2 * self.budget or self.cancelled)
            self.pending.append((self.count, check))
            self.pending_bytes += size
            self.count += 1
            if self._full():
                self.ready.notify_all()

    def _full(self) -> bool:
        return len(self.pending) >= self.batch or self.pending_bytes >= self.budget

    def start(self) -> None:
        """No more checks will come: run what is left on every worker."""
        with self.ready:
            self.done = True
            self.ready.notify_all()

    def _work(self) -> None:
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.done or self._full())
                taken, self.pending, last = self.pending, [], self.done
                self.running_bytes, self.pending_bytes = self.pending_bytes, 0
            if taken and not self.cancelled:
                self._run(taken, self.workers if last else 1)
            del taken  # the checked ops' tensors may go now
            with self.ready:
                self.running_bytes = 0
                self.ready.notify_all()
            if last:
                return

    def _run(self, taken: list[tuple[int, Check]], workers: int) -> None:
        try:
            self.failures += [(taken[k][0], err) for k, err in run_all([c for _, c in taken], workers)]
        except Exception as err:  # noqa: BLE001 - an unexpected error must not hang the engine
            index, check = taken[0]
            self.failures.append((index, RewriteMismatch(check.rule, check.where, f"the check failed to run: {err}")))

    def wait(self) -> None:
        """Wait for every check; raise the first failure in submission order."""
        self.start()
        self.thread.join()
        if self.failures:
            raise min(self.failures, key=lambda f: f[0])[1]

    def close(self) -> None:
        """Drop what is pending and stop."""
        self.cancelled = True
        self.start()
        self.thread.join()


def _expr_ops(e: Expr) -> list:
    out = [e.op]
    for i in e.inputs:
        if isinstance(i, Expr):
            out.extend(_expr_ops(i))
    return out


def check_shapes(leaves: list[Node], ops: list) -> list[tuple[int, ...]] | None:
    """Input shapes for the local check: batch 1 when every op allows it (``batch_free``); spatial axes shrunk when
    every op allows it."""
    if any(n.shape is None for n in leaves):
        return None
    batch_free = all(op.batch_free for op in ops)
    shapes = [(1, *n.shape[1:]) if batch_free else tuple(n.shape) for n in leaves]
    spatial = {s[2:] for s in shapes}
    if len(spatial) == 1 and all(op.shrinkable for op in ops):
        # per window: its extent plus two strides less one (both borders, an interior position, every phase)
        size = max([op.check_reach() for op in ops if op.check_reach()], default=3)
        shapes = [(*s[:2], *(min(n, size) for n in s[2:])) for s in shapes]
    return shapes


def _program(root: Node, expr: Expr, leaves: list[Node]) -> tuple[list, int, int]:
    """Both sides of a rewrite as one straight-line program over the leaves' values: a list of
    (op, input slots), and the slots holding the old root's value and the replacement's."""
    slots = {n.id: k for k, n in enumerate(leaves)}
    steps: list = []

    def old(n: Node) -> int:
        if n.id not in slots:
            args = [old(i) for i in n.inputs]
            steps.append((n.op, args))
            slots[n.id] = len(leaves) + len(steps) - 1
        return slots[n.id]

    def new(e: Expr | Node) -> int:
        if isinstance(e, Node):
            return slots[e.id]
        args = [new(i) for i in e.inputs]
        steps.append((e.op, args))
        return len(leaves) + len(steps) - 1

    result = steps, old(root), new(expr)
    del old, new  # recursive closures are reference cycles: break them (the caller may run with gc paused)
    return result


def prepare(rule: str, root: Node, expr: Expr, absorbed: list[Node], seed: int) -> Check:
    """The check of rewriting ``root`` (absorbing ``absorbed``) into ``expr``, captured now so that it may
    run while the graph changes. Raises Unknown when the leaves' shapes are unknown."""
    leaves = list({n.id: n for n in expr.leaves()}.values())
    shapes = check_shapes(leaves, [n.op for n in absorbed] + _expr_ops(expr))
    if shapes is None:
        raise Unknown()
    steps, want, got = _program(root, expr, leaves)
    return Check(rule, root.name, steps, shapes, want, got, seed)
