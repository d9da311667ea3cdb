"""Layer 6, the ``reparam`` command line (typer): commands in ``app`` (``main`` is the console script), tables
and progress in ``render``. Importing it imports neither torch nor rich."""
from reparam.cli.app import app, main

__all__ = ["app", "main"]
