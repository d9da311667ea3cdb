"""Silencing torch while a step that may fail runs: the caller turns the failure into one line."""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hide torch's log records and its direct prints to stderr for the block (torch.export logs a traceback
    or prints a partial graph before it raises); the caller turns the failure into one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
