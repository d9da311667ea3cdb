"""What a rewrite returns: an op applied to existing nodes or to other expressions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Expr:
    """``op`` (an Op) applied to ``inputs``: nodes of the graph, or other expressions."""

    op: Any
    inputs: tuple

    def leaves(self) -> list:
        """The graph nodes this expression reads, left to right."""
        out: list = []
        for i in self.inputs:
            out.extend(i.leaves() if isinstance(i, Expr) else [i])
        return out
