"""Layer 6, the ``reparam`` command line (typer): commands in ``app``, tables and progress in ``render``."""
from reparam.cli.app import app

__all__ = ["app"]
