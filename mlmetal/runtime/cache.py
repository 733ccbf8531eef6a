"""The compile cache: built artefacts keyed by the hash of everything that shaped them.

A cached shared library is code that will run, so an entry is trusted for who wrote it, never
for where it lies or what lies beside it:

- Every directory the cache uses (its root and each backend's subdirectory) must be a real
  directory, not a symlink, owned by this user, who may read and write it, and writable by
  nobody else. The cache creates them so (mode 0700) and refuses any other with a CacheError
  that names the directory and what to do.
- Each entry `name` has a MAC beside it, `name.mac`: HMAC-SHA256 of the entry's name and bytes
  under a key of 32 random bytes kept in `key` at the root, mode 0600. Only this user's
  processes can read the key, so only they can write a MAC that checks. A plain digest would
  prove nothing: whoever can plant a file can plant its digest. An entry whose MAC does not
  check (planted while a directory was open to others, truncated by a crash, or written by an
  older mlmetal) is rebuilt, never loaded.
- Entries, MACs and the key are opened without following symlinks (O_NOFOLLOW) and must be
  regular files of this user that nobody else can write.
- Entries are published by atomic rename: several processes may build the same entry at once;
  the last rename wins and every version is complete.

The directories above the root are trusted as the user's home directory is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class CacheError(RuntimeError):
    """The cache directory is unsafe or unusable."""


class _Untrusted(Exception):
    """A cache file that is not a regular file of this user, writable by them alone."""


def cache_dir() -> Path:
    """`MLMETAL_CACHE_DIR`, else `$XDG_CACHE_HOME/mlmetal`, else `~/.cache/mlmetal`; created private."""
    env = os.environ.get("MLMETAL_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "mlmetal"
    return _directory(root, parents=True)


def _directory(path: Path, parents: bool = False) -> Path:
    """`path`, created private if absent; CacheError unless it is this user's private directory."""
    fix = "set MLMETAL_CACHE_DIR to a directory of yours"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            path.mkdir(mode=0o700, parents=parents, exist_ok=True)
            st = os.lstat(path)
        except OSError as e:
            raise CacheError(f"compile cache {path}: cannot create it ({e.strerror}); {fix}") from None
    except OSError as e:
        raise CacheError(f"compile cache {path}: {e.strerror}; {fix}") from None
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"compile cache {path} is a symbolic link, and the cache follows none (a cached library is "
                         f"code that will run): remove the link (a private directory is made in its place), or {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"compile cache {path} is not a directory; {fix}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheError(f"compile cache {path} belongs to another user; {fix}")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"compile cache {path} is writable by others (mode {oct(mode)}); a cached library is "
                         f"code that will run: `chmod go-w {path}`, or {fix}")
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        raise CacheError(f"compile cache {path} is not readable and writable by you (mode {oct(mode)}): "
                         f"`chmod u+rwx {path}`, or {fix}")
    return path


def key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def _read_own(path: Path, private: bool = False) -> bytes:
    """The bytes of `path` if it is a regular file of this user that nobody else can write (nor read,
    when `private`); else _Untrusted. Neither a symlink nor a FIFO is opened, let alone read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError:  # a symlink (ELOOP), or unreadable
        raise _Untrusted from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_mode & (0o077 if private else 0o022)
                or (hasattr(os, "getuid") and st.st_uid != os.getuid())):
            raise _Untrusted
        return f.read()


def _mkstemp(folder: Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)  # mode 0600
    except OSError as e:
        raise CacheError(f"compile cache {folder}: cannot write to it ({e.strerror}); "
                         "set MLMETAL_CACHE_DIR to a directory of yours") from None


def _secret(root: Path) -> bytes:
    """This user's MAC key, kept in `root/key` (0600); made on first use."""
    path = root / "key"
    try:
        secret = _read_own(path, private=True)
    except FileNotFoundError:
        fd, tmp = _mkstemp(root, ".key-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # never replaces: a key another process published first stays
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: the last key wins, a loser's entries are rebuilt
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return _secret(root)
    except _Untrusted:
        secret = b""
    if len(secret) != 32:
        raise CacheError(f"compile cache key {path} is not a 32-byte file that only you can read and write; "
                         "delete it (every cached entry is then rebuilt once)")
    return secret


def _mac(secret: bytes, name: str, data: bytes) -> str:
    return hmac.new(secret, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _trusted(path: Path, mac_path: Path, secret: bytes) -> bool:
    try:
        mac = _read_own(mac_path).strip()
        return hmac.compare_digest(mac, _mac(secret, path.name, _read_own(path)).encode())
    except (FileNotFoundError, _Untrusted):
        return False


def lookup(name: str, build: Callable[[Path], None], subdir: str = "") -> tuple[Path, bool]:
    """The cached file `name`, built by `build(tmp_path)` when absent or not trusted.

    Returns (path, built) where `built` tells whether this call compiled it.
    """
    root = cache_dir()
    secret = _secret(root)
    folder = _directory(root / subdir) if subdir else root
    path, mac_path = folder / name, folder / (name + ".mac")
    if _trusted(path, mac_path, secret):
        return path, False
    fd, tmp = _mkstemp(folder, ".build-", path.suffix)
    os.close(fd)
    tmp_path, tmp_mac = Path(tmp), None
    try:
        build(tmp_path)
        os.chmod(tmp_path, 0o700)  # whatever mode the compiler gave it: this user's alone
        fd, tmp_mac = _mkstemp(folder, ".mac-")
        with os.fdopen(fd, "w") as f:
            f.write(_mac(secret, name, tmp_path.read_bytes()))
        # The artefact first, then its MAC: a reader that sees the new MAC sees the new file.
        for src, dst in ((tmp_path, path), (tmp_mac, mac_path)):
            try:
                os.replace(src, dst)
            except OSError as e:  # a directory in the way, say
                raise CacheError(f"compile cache entry {dst}: cannot replace it ({e.strerror}); remove it") from None
    finally:
        for leftover in (tmp_path, tmp_mac):
            if leftover is not None and os.path.lexists(leftover):
                os.unlink(leftover)
    return path, True
