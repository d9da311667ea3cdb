"""Rendering for the CLI: progress on stderr, before → after tables from a Report (rich on a terminal, plain
text in logs and pipes)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from reparam.core.report import Counts, Report

_ROWS = (("ops", "ops"), ("convs", "convs"), ("BNs", "bns"), ("linears", "linears"), ("params", "params"))


class Steps:
    """The phases of a run on stderr, one clock each (``seconds`` holds every finished phase's time, the same
    numbers the summary and the JSON report show).

    On a terminal: a bar counting the stages of the run (``stage k/N``) and, where the work reports them,
    the counts within a stage (``progress(phase, done, total)``), with the phase's own elapsed time; each
    finished phase leaves a ``✓ phase (time)`` line. In a log (stderr not a terminal): a timestamped line when
    a phase starts and one when it ends. Silent when ``quiet``."""

    def __init__(self, console: Console, quiet: bool, stages: int | None = None):
        self.console, self.quiet, self.stages = console, quiet, stages
        self.seconds: dict[str, float] = {}
        self.current: str | None = None  # the label of the running phase (for error messages)
        self._done = 0
        self._progress: Progress | None = None
        self._task = None

    # -- the bar (terminal only)
    def _bar(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
        return self._progress

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _stage_text(self) -> str:
        return f"stage {self._done + 1}/{self.stages}" if self.stages else ""

    def _begin(self, label: str) -> float:
        self.current = label
        if self.quiet:
            return time.perf_counter()
        if self.console.is_terminal:
            bar = self._bar()
            if self._task is not None:
                bar.remove_task(self._task)
            total = self.stages or None
            self._task = bar.add_task(label, total=total, completed=self._done, counts=self._stage_text())
        else:
            self.console.print(f"[{_clock()}] {label} …", highlight=False, soft_wrap=True, markup=False)
        return time.perf_counter()

    def _end(self, key: str, label: str, t0: float, detail: str = "") -> None:
        elapsed = time.perf_counter() - t0
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
        self._done += 1
        self.current = None
        if self.quiet:
            return
        line = f"✓ {label}{f': {detail}' if detail else ''} ({elapsed:.1f} s)"
        if self.console.is_terminal:
            if self._task is not None:
                self._bar().remove_task(self._task)
                self._task = None
            self.console.print(line, highlight=False, soft_wrap=True, markup=False)
        else:
            self.console.print(f"[{_clock()}] {line}", highlight=False, soft_wrap=True, markup=False)

    def count(self, done: int | None, total: int | None, what: str = "") -> None:
        """Counts within the running phase: the bar shows ``done/total what``."""
        if self.quiet or self._task is None or not self.console.is_terminal:
            return
        text = self._stage_text()
        if done is not None:
            text += f" · {done}{f'/{total}' if total else ''}{f' {what}' if what else ''}"
        self._bar().update(self._task, counts=text)

    @contextmanager
    def step(self, key: str, label: str, detail: Callable[[], str] | None = None) -> Iterator["Steps"]:
        """One phase called ``label``, timed into ``seconds[key]``; ``detail()`` adds to its ✓ line."""
        t0 = self._begin(label)
        try:
            yield self
        except BaseException:
            self.current = label  # the phase that failed, for the error message
            raise
        self._end(key, label, t0, detail() if detail is not None else "")

    @contextmanager
    def phases(self, labels: dict[str, str],
               detail: dict[str, Callable[[], str]] | None = None) -> Iterator[Callable[..., None]]:
        """Phases announced by a callback ``progress(name, done=None, total=None)`` (names looked up in
        ``labels``; a repeated name with counts updates the bar). ``detail[name]()`` adds to a phase's ✓ line."""
        state: dict = {"key": None, "label": None, "t0": None}
        detail = detail or {}

        def finish():
            if state["key"] is not None:
                hint = detail.get(state["key"])
                self._end(state["key"], state["label"], state["t0"], hint() if hint else "")

        def progress(name: str, done: int | None = None, total: int | None = None) -> None:
            if name == state["key"]:
                self.count(done, total)
                return
            finish()
            state["key"], state["label"] = name, labels.get(name, name)
            state["t0"] = self._begin(state["label"])
            if done is not None:
                self.count(done, total)

        try:
            yield progress
        except BaseException:
            self.current = state["label"]
            raise
        finish()


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def plain(renderable) -> str:
    """``renderable`` (a rich Table or text) as plain text for a log or a pipe: no colour, no wrapping at the
    terminal's width, no padding at the ends of lines."""
    import io

    buffer = io.StringIO()
    Console(file=buffer, width=100_000, color_system=None, force_terminal=False, soft_wrap=True,
            highlight=False).print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def show(console: Console, renderable) -> None:
    """Print to a terminal with rich; anywhere else as :func:`plain` text."""
    if console.is_terminal:
        console.print(renderable, highlight=False)
    else:
        console.file.write(plain(renderable))
        console.file.flush()


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


def seconds_text(seconds: dict[str, float]) -> str:
    """``load 0.1 s, rewrite 0.3 s, …, total 1.2 s``: the phases' own clocks (as their ✓ lines show them)."""
    return ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())


def summary_table(report: Report, title: str = "before → after", dry_run: bool = False,
                  seconds: dict[str, float] | None = None) -> Table:
    """Counts before → after (with the change), then the max error, the rules fired and the times."""
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
    if seconds:
        table.add_row("time", seconds_text(seconds))
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
