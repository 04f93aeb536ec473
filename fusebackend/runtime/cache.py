"""The on-disk kernel cache: one file per artifact, named by a hash of everything that shapes it.

Location: $FUSEBACKEND_CACHE_DIR, else $XDG_CACHE_HOME/fusebackend, else ~/.cache/fusebackend.
Entries are written to a temporary file and renamed into place (atomic on POSIX), and each carries a
SHA-256 of its content in a side file: a truncated or corrupt entry fails the check and is rebuilt.
A writer killed mid-write (SIGKILL, OOM) leaves its temporary file behind; the temporary name carries the
writer's pid and host, and the first open of a cache folder in a process removes those whose writer is gone.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
import threading
import time

TMP_PREFIX = ".tmp-"
STALE_AFTER_S = 600.0           # a dead writer's temporary file older than this is removed
UNKNOWN_STALE_AFTER_S = 86400.0  # no pid of this host in the name (older format, another machine): age alone

_swept: set[str] = set()         # cache folders already swept by this process
_sweep_lock = threading.Lock()


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
    _sweep_once(path)
    return path


def _sweep_once(path: str) -> None:
    key = os.path.realpath(path)
    with _sweep_lock:
        if key in _swept:
            return
        _swept.add(key)
    with contextlib.suppress(OSError):  # cleaning up must never stop a compile
        sweep_stale(path)


def _host() -> str:
    # hashed: a hostname may hold '-', the separator of the temporary name's fields
    return digest(socket.gethostname())[:8]


def _tmp_prefix() -> str:
    return "%s%d-%s-" % (TMP_PREFIX, os.getpid(), _host())   # evaluated per write: a forked child has its own pid


def _writer(name: str):
    """(pid, host) encoded in a temporary file's name, or None for a name without them."""
    fields = name[len(TMP_PREFIX):].split("-")
    if len(fields) < 3 or not fields[0].isdigit() or int(fields[0]) <= 0:
        return None
    return int(fields[0]), fields[1]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                 # EPERM: alive, another user's
        return True
    try:                            # a zombie (killed, not yet reaped) writes nothing more
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(name: str, age_s: float, host: str | None = None) -> bool:
    """Whether a temporary file `age_s` seconds old may be removed: its writer is a dead process of this host
    and it is older than STALE_AFTER_S; without a pid of this host, older than UNKNOWN_STALE_AFTER_S."""
    writer = _writer(name)
    if writer is not None and writer[1] == (host or _host()):
        return age_s > STALE_AFTER_S and not _alive(writer[0])
    return age_s > UNKNOWN_STALE_AFTER_S


def sweep_stale(root: str, now: float | None = None) -> list[str]:
    """Remove the stale temporary files in `root` and its subfolders (cpu/, cuda/, profiles/); their paths."""
    now, host, removed = time.time() if now is None else now, _host(), []
    folders = [root] + [e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    for folder in folders:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for e in entries:
                if not e.name.startswith(TMP_PREFIX) or not e.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):   # another process may remove it first
                    if is_stale(e.name, now - e.stat(follow_symlinks=False).st_mtime, host):
                        os.unlink(e.path)
                        removed.append(e.path)
    return removed


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=_tmp_prefix())
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
