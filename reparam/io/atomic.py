"""Writing files all or nothing: a temporary file beside each target (``.NAME.PID.XXXX.partial.EXT``), renamed
into place when the block succeeds, removed otherwise; temporary files of killed runs (their process is
gone) are removed by the next write; file-system failures (a full disk, a name too long) become one
ReparamError naming the file."""
from __future__ import annotations

import errno
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from reparam.errors import ReparamError

_STEM = 60  # characters of the output's name kept in its temporary file's name
_LEGACY_STALE_SECONDS = 3600  # temporary files of older reparam versions (no process id) this old are stale


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_writable(path: str | os.PathLike, what: str = "output", option: str = "-o") -> None:
    """Fail now, before any work, if ``path`` cannot be written: its folder is missing, it is a directory, or
    its name is longer than the file system allows."""
    path = Path(path)
    folder = path.parent
    longest = _name_max(folder) if folder.is_dir() else 255
    if len(os.fsencode(path.name)) > longest:
        raise ReparamError(f"the {what} name given to {option} is {len(os.fsencode(path.name))} bytes long; this "
                           f"file system allows {longest}: choose a shorter name")
    if path.is_dir():
        raise ReparamError(f"the {what} '{path}' is a directory; give a file path")
    if not folder.is_dir():
        raise ReparamError(f"cannot write the {what} '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReparamError(f"cannot write the {what} '{path}': folder '{folder}' is not writable")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` whose process is gone (a SIGKILLed run)."""
    stem = re.escape(path.stem[:_STEM])
    mine = re.compile(rf"^\.{stem}\.(\d+)\.[^.]+\.partial{re.escape(path.suffix)}$")
    legacy = re.compile(rf"^\.{stem}\.[^.]+\.partial{re.escape(path.suffix)}$")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = mine.match(entry.name)
        stale = (m is not None and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))) or (
            m is None and legacy.match(entry.name) is not None
            and time.time() - entry.stat().st_mtime > _LEGACY_STALE_SECONDS)
        if stale and entry.is_file():
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _write_error(err: BaseException, path: Path) -> ReparamError:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ReparamError(f"cannot write '{path}': no space left on the device; free some space or choose "
                            f"another folder")
    if isinstance(err, OSError):
        return ReparamError(f"cannot write '{path}': {err.strerror or err}")
    return ReparamError(f"cannot write '{path}': {_first(err)} (is the disk full?)")


def is_write_failure(err: BaseException) -> bool:
    """An error of the file system under a writer (torch's C++ writer reports them as RuntimeError)."""
    if isinstance(err, OSError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("file write failed" in text or "failed writing" in text
                                              or "no space left" in text)


def _create_temporary(path: Path, temps: list[str]) -> None:
    """Create a new empty temporary file beside ``path``, named in ``temps`` before it exists: a signal raised
    at any point (SIGTERM, interrupt) leaves no file that the cleanup does not know of."""
    while True:
        tmp = str(path.parent / f".{path.stem[:_STEM]}.{os.getpid()}.{secrets.token_hex(4)}.partial{path.suffix}")
        temps.append(tmp)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return
        except FileExistsError:
            temps.pop()  # another file of that name: not ours, try another
        except OSError as err:
            temps.pop()
            raise _write_error(err, path) from err


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """A temporary path beside each of ``paths``; all renamed into place if the block succeeds, all removed
    otherwise (so a failure leaves every previous file as it was). A file-system failure (disk full) inside
    the block becomes a ReparamError naming the file."""
    temps: list[str] = []
    paths = tuple(map(Path, paths))
    try:
        for path in paths:
            folder = path.parent
            if not folder.is_dir():
                raise ReparamError(f"cannot write '{path}': folder '{folder}' does not exist")
            clean_stale(path)
            _create_temporary(path, temps)
        try:
            yield list(temps)
        except Exception as err:
            if isinstance(err, ReparamError) or not is_write_failure(err):
                raise
            raise _write_error(err, paths[0]) from err
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, paths):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path``; renamed onto ``path`` if the block succeeds, removed otherwise."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""
