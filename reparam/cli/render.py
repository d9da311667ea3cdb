"""Terminal rendering for the CLI: progress on stderr, before → after tables from a Report (rich)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from reparam.core.report import Counts, Report

_ROWS = (("ops", "ops"), ("convs", "convs"), ("BNs", "bns"), ("linears", "linears"), ("params", "params"))


class Steps:
    """A spinner per long step on stderr (a plain "✓ step (time)" line when stderr is not a terminal);
    silent when ``quiet``."""

    def __init__(self, console: Console, quiet: bool):
        self.console, self.quiet = console, quiet

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        t0 = time.perf_counter()
        if self.console.is_terminal:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console, transient=True) as progress:
                progress.add_task(description, total=None)
                yield
        else:
            yield
        self.console.print(f"[green]✓[/] {description} ({time.perf_counter() - t0:.1f} s)", highlight=False,
                           soft_wrap=True)


    @contextmanager
    def phases(self, fallback: str, labels: dict[str, str]) -> Iterator[Callable[[str], None]]:
        """Steps announced by a callback (``enter(name)``, names looked up in ``labels``); each finished
        step gets its ✓ line. With no announcement at all, one step called ``fallback``."""
        if self.quiet:
            yield lambda name: None
            return
        state = {"label": None, "t0": time.perf_counter()}
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=self.console, transient=True, disable=not self.console.is_terminal)
        task = progress.add_task(fallback, total=None)

        def done():
            if state["label"] is not None:
                self.console.print(f"[green]✓[/] {state['label']} ({time.perf_counter() - state['t0']:.1f} s)",
                                   highlight=False, soft_wrap=True)

        def enter(name: str) -> None:
            done()
            state["label"], state["t0"] = labels.get(name, name), time.perf_counter()
            progress.update(task, description=state["label"])

        with progress:
            yield enter
            if state["label"] is None:
                state["label"] = fallback
            done()


def _fmt(x) -> str:
    return "?" if x is None else f"{x:,}"


def _change(b, a) -> str:
    if b is None or a is None:
        return ""
    if b == a:
        return "="
    return f"{a - b:+,}" + (f", {(a - b) / b:+.0%}" if b else "")


def fired_text(report: Report) -> str:
    counts = report.fired_counts()
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def error_text(report: Report) -> str:
    v = report.verification
    if v.skipped:
        return f"not verified ({v.skipped})"
    if v.passed is None or v.error_fp64 is None:
        return "not verified"
    text = f"{v.error_fp64:.2e} in float64 (tolerance {v.tolerance:.0e})"
    if v.error_native is not None:
        text += f", {v.error_native:.2e} in the model's dtype"
    return text


def summary_table(report: Report, title: str = "before → after", dry_run: bool = False) -> Table:
    """Counts before → after (with the change), then the max error and the rules fired."""
    table = Table(title=title, title_justify="left", show_header=False, show_edge=False, pad_edge=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("before → after")
    b, a = report.before, report.after
    for label, key in _ROWS:
        bv = getattr(b, key) if isinstance(b, Counts) else None
        av = getattr(a, key) if isinstance(a, Counts) else None
        change = _change(bv, av)
        table.add_row(label, f"{_fmt(bv)} → {_fmt(av)}" + (f"  ({change})" if change else ""))
    if not dry_run:
        table.add_row("max error", error_text(report))
    table.add_row("rules that fire" if dry_run else "rules fired", fired_text(report))
    return table


def where_list(paths: Sequence[str], limit: int = 4) -> str:
    shown = [p or "<model>" for p in paths[:limit]]
    more = len(paths) - limit
    return ", ".join(shown) + (f", … (+{more})" if more > 0 else "")


def fired_table(report: Report) -> Table:
    table = Table(title="rules that fire", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("rule", style="bold")
    table.add_column("times", justify="right")
    table.add_column("where")
    by_rule: dict[str, list[str]] = {}
    for e in report.rules_fired:
        by_rule.setdefault(e["rule"], [])
        if e["where"] not in by_rule[e["rule"]]:
            by_rule[e["rule"]].append(e["where"])
    counts = report.fired_counts()
    for rule in sorted(by_rule, key=lambda r: (-counts[r], r)):
        table.add_row(rule, str(counts[rule]), where_list(by_rule[rule]))
    return table


def refusals_table(report: Report, limit: int = 20) -> Table:
    table = Table(title=f"refusals ({len(report.refusals)})", title_justify="left", show_edge=False,
                  pad_edge=False)
    table.add_column("rule", style="bold")
    table.add_column("where")
    table.add_column("why")
    for e in report.refusals[:limit]:
        table.add_row(e["rule"], e["where"] or "<model>", e["detail"])
    if len(report.refusals) > limit:
        table.add_row("…", f"{len(report.refusals) - limit} more", "(see --json)")
    return table


def latency_table(rows: Sequence[tuple[str, float]], ratio: float) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("model", style="bold")
    table.add_column("median ms", justify="right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds * 1e3:.3f}")
    table.add_section()
    table.add_row("speed-up", f"{ratio:.2f}×", style="bold")
    return table
