"""What the benchmark scripts share when they write results: the machine line and a script's own section of a
docs page, replaced in place (between its begin/end markers) so that the other scripts' sections stay."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def machine(memory: bool = False) -> str:
    """``N CPUs (model)[, M GiB], Linux release`` of this machine."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                   platform.processor() or "unknown CPU")
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB" if memory else ""
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, Linux {platform.release()}"


def markers(name: str) -> tuple[str, str]:
    """The begin/end markers of the section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(doc: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of section ``name`` in ``doc`` (appended if the section is new), keeping
    the rest of the page as it is; written atomically (a temporary file renamed over the page)."""
    begin, end = markers(name)
    doc.parent.mkdir(parents=True, exist_ok=True)
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)
