"""Write outputs so that a failure never leaves a half-written file or folder behind."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import tempfile
import threading
from typing import Iterator

from eqcompiler.errors import EqcError


def check_output_dir(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty folder unless asked, and say how to ask."""
    if out.exists() and not out.is_dir():
        raise EqcError(f"output '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EqcError(f"output folder '{out}' is not empty; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        raise EqcError(f"output folder's parent '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise EqcError(f"cannot write to '{parent}' (permission denied)")


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Outputs this process renamed into place: an interrupt after that point did not lose them (the CLI says so).
COMMITTED: list[pathlib.Path] = []


def _staging_prefix(out: pathlib.Path) -> str:
    return f".{out.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove staging folders beside `out` left by an eqc process that no longer runs (killed with SIGKILL,
    or a power cut): their names carry the writer's pid. Returns what was removed."""
    removed = []
    parent = out.resolve().parent
    prefix = _staging_prefix(out)
    for entry in parent.glob(prefix + "*") if parent.is_dir() else []:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a staging folder is created and registered for cleanup, so an interrupt
    cannot land between its creation and the `try` that removes it (Python runs handlers on unblock)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def staged_dir(out: pathlib.Path, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename."""
    out = pathlib.Path(out)
    check_output_dir(out, overwrite)
    sweep_stale_staging(out)
    parent = out.resolve().parent
    tmp: pathlib.Path | None = None
    try:
        with _signals_deferred():
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
        yield tmp
        if out.exists():
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            COMMITTED.append(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
            COMMITTED.append(out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: pathlib.Path, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `out`; on success it is renamed onto `out`."""
    out = pathlib.Path(out)
    if out.exists() and out.is_dir():
        raise EqcError(f"output '{out}' is a folder, expected a file path")
    if out.exists() and not overwrite:
        raise EqcError(f"output file '{out}' exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise EqcError(f"output file's folder '{parent}' does not exist")
    tmp: pathlib.Path | None = None
    try:
        with _signals_deferred():
            fd, name = tempfile.mkstemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent)
            os.close(fd)
            tmp = pathlib.Path(name)
        yield tmp
        os.replace(tmp, out)
        COMMITTED.append(out)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
