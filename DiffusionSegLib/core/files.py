"""Files written safely and checked: atomic writes (temporary name, then rename) and sha256 digests."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename (never a half-written file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs and models are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """``data`` as JSON (UTF-8, trailing newline), written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))


def replace_folder(staging: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Move a finished folder into place; a previous ``out_dir`` is moved aside first, then removed.

    Readers never see a half-written folder: ``out_dir`` is either the old one or the new one.
    """
    import shutil

    staging, out_dir = Path(staging), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)


@contextmanager
def staged_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder of ``out_dir`` to write into; when the block ends normally it
    replaces ``out_dir`` (:func:`replace_folder`), when it raises it is removed and ``out_dir`` is left."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a dataset is shared like its siblings
    try:
        yield staging
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a replace
