"""Writing files so that no reader sees half of one and nothing is clobbered (private).

One writer for everything kappatune puts on disk: the κ cache's database file, the CLI's ``-o``
files, deltas and the study's results folder. A file is written to a temporary name with an
unpredictable suffix in the destination's folder (``O_EXCL``: no existing path is followed),
flushed to disk, given the permissions the umask allows and renamed (or, for a file that must not
replace anything, hard-linked) onto its name. A failure at any point removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["umask", "new_file_mode", "write_atomic"]


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ≥ 4.7), so that other
    threads creating files meanwhile are not affected."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode(existing: Optional[Path] = None) -> int:
    """``0666 & ~umask``, widened by the bits an ``existing`` file already grants (never narrower)."""
    mode = 0o666 & ~umask()
    if existing is not None:
        with contextlib.suppress(OSError):
            mode |= stat.S_IMODE(os.stat(existing).st_mode)
    return mode


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, Callable[[Path], None]], *,
                 exclusive: bool = False, mode: Optional[int] = None) -> bool:
    """Put ``data`` at ``path`` all at once.

    Args:
        path (path-like): the destination; its folder must exist.
        data (bytes or callable): the content, or a function that writes the file at the path it is
            given (e.g. ``safetensors.torch.save_file``).
        exclusive (bool, optional): never replace an existing ``path`` (hard link instead of
            rename). Default: ``False``.
        mode (int, optional): the permission bits. Default: ``0666 & ~umask``, widened by those of
            the file being replaced.

    Returns:
        bool: ``False`` when ``exclusive`` and ``path`` already existed (nothing written), else
        ``True``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if mode is None:
            mode = new_file_mode(None if exclusive or not path.exists() else path)
        os.chmod(tmp, mode)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return True
        os.replace(tmp, path)
        return True
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

