"""Small helpers for the files fsrl reads and writes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path, length: int = 64) -> str | None:
    """The hex sha256 of a file (its first `length` digits), read in 1 MiB chunks; None when
    `path` is not a file."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
