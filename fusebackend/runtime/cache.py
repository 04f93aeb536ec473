"""The on-disk kernel cache: one file per artifact, named by a hash of everything that shapes it.

Location: $FUSEBACKEND_CACHE_DIR, else $XDG_CACHE_HOME/fusebackend, else ~/.cache/fusebackend.
Entries are written to a temporary file and renamed into place (atomic on POSIX), and each carries a
SHA-256 of its content in a side file: a truncated or corrupt entry fails the check and is rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile


class CacheDirError(OSError):
    """The kernel cache folder cannot be created or written; the message names where its path came from."""


def cache_dir(override: str | None = None) -> str:
    path, source = override, "option cache_dir"
    if not path:
        path, source = os.environ.get("FUSEBACKEND_CACHE_DIR"), "$FUSEBACKEND_CACHE_DIR"
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path, source = os.path.join(base, "fusebackend"), "the default ($XDG_CACHE_HOME or ~/.cache)"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CacheDirError("kernel cache folder %r (from %s) is not usable: %s" % (path, source, e)) from e
    return path


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(path: str, data: bytes) -> None:
    """Write an entry, then its checksum (a reader trusts the entry only when both agree)."""
    write_atomic(path, data)
    write_atomic(path + ".sha256", hashlib.sha256(data).hexdigest().encode())


def load_verified(path: str) -> bytes | None:
    """The entry's bytes if present and intact, else None (the caller rebuilds it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with open(path + ".sha256", "rb") as f:
            want = f.read().decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return data if hashlib.sha256(data).hexdigest() == want else None


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock shared between processes building the same entry."""
    with open(path + ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
