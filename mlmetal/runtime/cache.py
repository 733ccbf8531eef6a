"""The compile cache: built artefacts keyed by the hash of everything that shaped them.

A cached shared library is code that will run, so the cache lives in a per-user
directory that nobody else can write, entries are published by atomic rename (several
processes may compile the same entry at once; the last rename wins and both are
complete), and each entry carries a digest that is checked before use, so a truncated
or corrupted entry is rebuilt instead of loaded.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable


class CacheError(RuntimeError):
    """The cache directory is unsafe or unusable."""


def cache_dir() -> Path:
    """`MLMETAL_CACHE_DIR`, else `$XDG_CACHE_HOME/mlmetal`, else `~/.cache/mlmetal`; created private."""
    env = os.environ.get("MLMETAL_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "mlmetal"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = root.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheError(f"compile cache {root} belongs to another user; set MLMETAL_CACHE_DIR to a directory of yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"compile cache {root} is writable by others (mode {oct(st.st_mode & 0o777)}); "
                         f"a cached library is code that will run: `chmod go-w {root}` or set MLMETAL_CACHE_DIR")
    return root


def key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lookup(name: str, build: Callable[[Path], None], subdir: str = "") -> tuple[Path, bool]:
    """The cached file `name`, built by `build(tmp_path)` when absent or corrupt.

    Returns (path, built) where `built` tells whether this call compiled it.
    """
    root = cache_dir() / subdir if subdir else cache_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path, sig = root / name, root / (name + ".sha256")
    if path.is_file() and sig.is_file():
        try:
            if sig.read_text().strip() == _digest(path):
                return path, False
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".build-", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        build(tmp_path)
        digest = _digest(tmp_path)
        fd, tmp_sig = tempfile.mkstemp(dir=root, prefix=".sig-")
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        # The artefact first, then its digest: a reader that sees the new digest sees the new file.
        os.replace(tmp_path, path)
        os.replace(tmp_sig, sig)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path, True
