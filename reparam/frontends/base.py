"""The front-end protocol: what the one fuse driver (:mod:`reparam.frontends.pipeline`) needs of a front end.

A front end reads its input into IR graphs (one per region it can rewrite), writes rewritten graphs back, and
runs the original and the fused result on the same probe inputs: in float64 (the exactness check) and in the
model's own dtype (the deploy check). Everything else (rule selection, the engine, bisection, progress, notes,
the report) is the driver's, so it behaves the same for torch.fx, torch.export and ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from reparam.core.ir import Graph, Node
from reparam.core.report import Counts, Report


@dataclass
class Region:
    """One IR graph to rewrite: where it sits in the input ('' for the whole input), the graph, what it was read
    from, and, once rewritten, what the front end wrote back and how many rewrites were applied."""

    path: str
    graph: Graph
    source: Any = None
    fused: Any = None
    count: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Outputs:
    """Flat outputs on the probe inputs: ``exact`` in float64 (None where the front end cannot evaluate the
    model in float64), ``native`` in the model's own dtype(s) (None where it cannot run it), and ``rounding``, a
    second run as deployed that rounds differently (it shows the outputs' magnitude when there is no float64
    result), or None."""

    exact: list | None
    native: list | None
    rounding: list | None = None


class FrontEnd(Protocol):
    """One input being fused. ``subject`` names it in messages ("model", "program", "ONNX model")."""

    subject: str

    def prepare(self, report: Report) -> None:
        """Check the input and note what the report should say before any work (training mode, guessed inputs)."""

    def import_graphs(self, report: Report) -> list[Region]:
        """The IR graphs to rewrite, freshly read from the (unchanged) input; import notes go to ``report``."""

    def import_more(self, regions: list[Region], report: Report) -> list[Region]:
        """Optional. Regions read from the rewritten and exported ``regions`` (e.g. the whole graph of a model over
        its fused submodules, where the rewrites that cross their boundaries remain), rewritten after them."""

    def export(self, region: Region) -> Any:
        """``region.graph`` (rewritten) written back in the front end's own form (the region's deploy object)."""

    def assemble(self, regions: list[Region], report: Report) -> Any:
        """The fused result built from the exported regions (the input itself is never modified)."""

    def opaque_kind(self, node: Node) -> str:
        """The name of the operation an opaque node stands for (a module class, an ONNX op type, ...)."""

    def cannot_verify(self) -> str | None:
        """Why there is no end-to-end verification (e.g. no example inputs), or None."""

    def input_shapes(self) -> list[list[int]]:
        """The shapes of the probe inputs, for the report."""

    def reference(self, regions: list[Region]) -> Outputs:
        """The original on the probe inputs. Called before the engine touches the freshly imported ``regions``
        (a front end whose float64 evaluation runs on the IR evaluates them here)."""

    def exact(self, fused: Any, regions: list[Region]) -> list | None:
        """The fused result in float64, its new tensors computed (not cast) in float64; None if not evaluable."""

    def recheck(self, fused: Any, regions: list[Region]) -> tuple[list, list] | None:
        """Optional. The original's and the fused result's float64 outputs by the reference semantics (float64
        copies of both), confirming a mismatch a cheaper float64 evaluation (``reference``/``exact``) found."""

    def native(self, fused: Any) -> list | None:
        """The fused result as deployed, in its own dtype(s)."""

    def misread(self) -> list[str]:
        """Operations the import reads wrongly (checked only when verification fails); [] if not checkable."""

    def finish(self, fused: Any, report: Report) -> Any:
        """The artifact returned to the caller (e.g. an ExportedProgram exported again from the fused graph)."""

    def count(self, artifact: Any, original: bool) -> Counts:
        """Counts of the original input (``original``) or of the returned artifact."""


def names(values: Sequence[str], at_most: int = 3) -> str:
    """'a', 'b', 'c' and 4 more."""
    more = f" and {len(values) - at_most} more" if len(values) > at_most else ""
    return ", ".join(repr(v) for v in values[:at_most]) + more
