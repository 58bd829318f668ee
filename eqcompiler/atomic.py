"""Write outputs so that a failure never leaves a half-written file or folder behind."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

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


@contextlib.contextmanager
def staged_dir(out: pathlib.Path, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename."""
    out = pathlib.Path(out)
    check_output_dir(out, overwrite)
    parent = out.resolve().parent
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
    try:
        yield tmp
        if out.exists():
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
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
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: pathlib.Path, data: Any) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
