"""Writing a file so that a reader never sees half of it: the one atomic write.

A temporary file in the same directory, written, flushed and fsynced, then renamed over
the target, then the directory fsynced (so the rename itself survives a crash). Used for
the zone file (``atlasd.dns.writer``) and every file of standalone's store
(``atlasd.standalone``). Blocking: call it from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, *, mode: int = 0o644, make_parents: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8), readable per ``mode``, all or nothing."""
    directory = path.parent
    if make_parents:
        directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            tmp.write(text.encode("utf-8"))
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
