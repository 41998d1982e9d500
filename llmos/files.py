"""Writing files so that a crash or a full disk never loses the previous version."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llmos.errors import LlmosError

UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A crash or a full disk leaves the previous file whole and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LlmosError(f"{path}: could not write ({e.strerror or e}); free some disk space and run again, "
                         "the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
