"""Writes that lose nothing: a file written whole or not at all, and a full disk reported as
one line naming the path and the fix (never a half-written file taken for a whole one)."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable

from etils import epath

# errno values of a full disk or an exhausted quota, and how storage libraries that do not
# raise OSError say it.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


class DiskFullError(OSError):
    """A write failed because its disk is full (or its quota exhausted); the message names the path and the fix."""


def is_disk_full(error: BaseException) -> bool:
    """Returns whether error, or an error it was raised from or during, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path, what: str = "", intact: str = "what was written before is intact") -> DiskFullError:
    """Returns the one-line DiskFullError of a write to path that found its disk full: `what`
    adds to the diagnosis, `intact` says what was not lost."""
    return DiskFullError(
        f"{path}: no space left on its disk{what}: free space there, or move the workdir to a disk with room "
        f"and pass it as --workdir; {intact}."
    )


def write_atomic(path, text: str) -> None:
    """Writes text to path whole or not at all (see write_with); raises DiskFullError on a full disk."""
    path = epath.Path(path)
    if "://" in str(path):  # an object store's upload is already whole or absent
        path.write_text(text)
        return

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_with(path, write)


def write_with(path, write: Callable[[str], None]) -> None:
    """Calls write(temporary path beside path), then renames the file it wrote to path: path is
    whole or as it was. Raises DiskFullError (one line, naming path) on a full disk."""
    path = os.fspath(path)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_disk_full(error):
            raise disk_full_error(path) from error
        raise
