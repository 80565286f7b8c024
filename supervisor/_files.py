"""Files the host writes for others to read, written so that no reader sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a reader sees the old file or the new
    one, never an empty or partial one (a file written in place is empty between its
    truncation and the write), and after a crash it is one or the other, whole.

    The data goes to a temporary file in the same directory (so the rename stays on one
    filesystem), is flushed to disk, and replaces ``path`` with ``os.replace``.

    Raises:
        OSError: the directory is not writable or the disk is full; ``path`` is unchanged
            and no temporary file is left behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # (mkstemp makes it 0600; readers are other processes of the user)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
