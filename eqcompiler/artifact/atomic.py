"""Write outputs so that a failure never leaves a half-written file or folder behind, and so that of two
writers to the same new output exactly one wins.

A folder output is claimed before any work: the writer creates the output folder if it is missing (an
exclusive mkdir) and holds an flock on a marker file inside it (`WRITER_MARKER`) while it works in a staging
sibling. A second writer finds the marker locked and is refused at once; a lock dies with its process, so a
writer killed with SIGKILL leaves a reservation the next writer takes over. The finished staging folder is
swapped with the reservation in one renameat2(RENAME_EXCHANGE) (where the system has it; else the marker is
removed and the staging folder renamed onto the then empty folder), so the output appears complete or not
at all. A file output without --overwrite is renamed into place only if nothing is there
(renameat2(RENAME_NOREPLACE), else a hard link).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Iterator

from eqcompiler.errors import EqcError

# Present in an output folder while an eqc writer holds it (locked with flock); never part of an artifact.
WRITER_MARKER = ".eqc-writing"


def _entries(folder: pathlib.Path) -> list[str]:
    """What a folder holds, a writer's marker aside."""
    return [name for name in os.listdir(folder) if name != WRITER_MARKER]


def check_output_dir(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty folder unless asked, and say how to ask."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise EqcError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and _entries(out) and not overwrite:
        raise EqcError(f"output folder '{out}' is not empty; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        raise EqcError(f"output folder's parent '{parent}' does not exist")
    if not parent.is_dir():
        raise EqcError(f"output folder's parent '{parent}' is not a folder")
    if not os.access(parent, os.W_OK):
        raise EqcError(f"cannot write to '{parent}' (permission denied)")


def check_output_file(out: pathlib.Path, overwrite: bool) -> None:
    """The refusals of a file output (statistics, report), decided before any work."""
    out = pathlib.Path(out)
    if out.is_dir():
        raise EqcError(f"output '{out}' is a folder, expected a file path")
    if out.exists() and not overwrite:
        raise EqcError(f"output file '{out}' exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise EqcError(f"output file's folder '{parent}' does not exist")
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


# ------------------------------------------------------------------ renameat2

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=None)
def _libc_renameat2() -> Any:
    """glibc's renameat2 (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: pathlib.Path, dst: pathlib.Path, flags: int) -> bool:
    """rename(src, dst) with renameat2 flags. False (nothing done) where the system or the filesystem has no
    such call or flag, so the caller falls back; any other failure raises OSError (FileExistsError for
    RENAME_NOREPLACE onto an existing path)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(src)), _AT_FDCWD, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Rename the file `src` onto `dst` only if `dst` does not exist (FileExistsError otherwise)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    try:
        os.link(src, dst)  # atomic and exclusive: fails if dst exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race remains)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.replace(src, dst)
        return
    os.unlink(src)


# ------------------------------------------------------------------ claiming an output folder

def _same_file(path: pathlib.Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


class _Claim:
    """This process holds `folder` (an empty or missing output) through a locked marker inside it."""

    def __init__(self, folder: pathlib.Path, fd: int, made_folder: bool) -> None:
        self.folder, self.fd, self.made_folder = folder, fd, made_folder

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def release(self) -> None:
        """Give the output up after a failure: leave it as it was found (missing, or an empty folder)."""
        marker = self.folder / WRITER_MARKER
        with contextlib.suppress(OSError):
            if self.fd >= 0 and _same_file(marker, self.fd):
                os.unlink(marker)
        if self.made_folder:
            with contextlib.suppress(OSError):  # not empty: another writer holds it now
                os.rmdir(self.folder)
        self.close()


def _not_empty(out: pathlib.Path) -> EqcError:
    return EqcError(f"output folder '{out}' is not empty; pass --overwrite to replace it")


def _claim(out: pathlib.Path, overwrite: bool, missing_at_start: bool) -> _Claim | None:
    """Reserve the output folder for this writer; None when a non-empty folder is to be replaced
    (--overwrite). Refuses (EqcError, exit 2) when another writer holds it or it is not empty."""
    for _attempt in range(3):
        try:
            os.mkdir(out)
        except FileExistsError:
            if not out.is_dir():
                raise EqcError(f"output '{out}' exists and is not a folder") from None
            if _entries(out):
                if overwrite:
                    return None
                raise _not_empty(out) from None
        marker = out / WRITER_MARKER
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:  # the folder went away meanwhile (a writer gave up): try again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EqcError(f"another eqc process is writing '{out}'; wait for it to finish or choose "
                               "another -o") from None
            if not _same_file(marker, fd):  # the holder finished or gave up between our open and our lock
                os.close(fd)
                fd = -1
                continue
            if _entries(out):  # a writer finished just before our marker appeared in its output
                os.unlink(marker)
                if overwrite:
                    os.close(fd)
                    return None
                raise _not_empty(out)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return _Claim(out, fd, missing_at_start)
    raise EqcError(f"another eqc process is writing '{out}'; wait for it to finish or choose another -o")


def _commit(tmp: pathlib.Path, out: pathlib.Path, claim: _Claim | None) -> pathlib.Path | None:
    """Put the finished staging folder `tmp` in place of `out`; returns a folder left to delete."""
    if claim is None:  # replacing a non-empty folder (--overwrite)
        if not os.path.lexists(out):
            os.rename(tmp, out)
            return None
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            return tmp  # now holds the old output
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=tmp.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        return trash
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        return tmp  # now holds the empty reservation and its marker
    # No exchange here: free the reserved folder, then rename onto it (allowed onto an empty folder). A
    # writer that claims the folder in between makes this rename fail; that writer then wins.
    os.unlink(out / WRITER_MARKER)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise EqcError(f"another eqc process claimed '{out}' while this one finished; nothing was "
                           "written") from None
        raise
    return None


@contextlib.contextmanager
def staged_dir(out: pathlib.Path, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Claim `out` and yield a temporary folder beside it; on success it replaces `out` in one rename.

    Enter it before any work: every refusal of the output (not empty, a file, a missing or read-only
    parent, another writer) happens here.
    """
    out = pathlib.Path(out)
    check_output_dir(out, overwrite)
    sweep_stale_staging(out)
    parent = out.resolve().parent
    missing_at_start = not os.path.lexists(out)
    tmp: pathlib.Path | None = None
    claim: _Claim | None = None
    leftover: pathlib.Path | None = None
    try:
        with _signals_deferred():
            claim = _claim(out, overwrite, missing_at_start)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
        yield tmp
        with _signals_deferred():
            leftover = _commit(tmp, out, claim)
            tmp = None
            COMMITTED.append(out)
            if claim is not None:
                claim.close()
                claim = None
    except BaseException:
        for folder in (tmp, leftover):  # leftover: an interrupt that arrived during the commit (output complete)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if claim is not None:
            claim.release()
        raise
    if leftover is not None:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: pathlib.Path, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `out`; on success it is renamed onto `out` (without `overwrite`, only
    if nothing appeared there meanwhile: of two writers exactly one wins)."""
    out = pathlib.Path(out)
    check_output_file(out, overwrite)
    parent = out.resolve().parent
    tmp: pathlib.Path | None = None
    try:
        with _signals_deferred():
            fd, name = tempfile.mkstemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent)
            os.close(fd)
            tmp = pathlib.Path(name)
        yield tmp
        with _signals_deferred():
            if overwrite:
                os.replace(tmp, out)
            else:
                try:
                    _rename_noreplace(tmp, out)
                except FileExistsError:
                    raise EqcError(f"output file '{out}' was written by another process meanwhile; pass "
                                   "--overwrite to replace it") from None
            tmp = None
            COMMITTED.append(out)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
