"""Files and folders published whole: written under a temporary name beside the target, then renamed over it."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """
    A temporary sibling of `path` to write to, renamed to `path` when the block ends, so that a reader or a rerun
    after a crash finds the old file or the new one, never half of one. The name is unique, so that processes writing
    the same target never write into each other's file. On error the temporary is removed and `path` left as it was.

    With `folder=True` the temporary is an empty folder; an existing folder at `path` is deleted just before the rename
    (a folder cannot be renamed over a non-empty one), so that `path` is briefly absent, never partial.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    if folder:
        staging.mkdir()
    try:
        yield staging
        if folder:
            shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except BaseException:
        if folder:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


__all__ = ["replaced_atomically"]
