"""Progress of long compiles on a terminal: "fusebackend: compiling kernels 3/12" on stderr.

The backend calls start(total) before compiling a graph's kernels, step() after each one, done() at the
end. Nothing is printed unless stderr is a terminal, the work takes longer than DELAY seconds, and
$FUSEBACKEND_PROGRESS is not "0"; calls from several threads are safe.
"""
from __future__ import annotations

import os
import sys
import threading
import time

DELAY = 0.5            # seconds before the first line: cache hits finish without any output
_lock = threading.Lock()
_state = {"total": 0, "count": 0, "t0": 0.0, "shown": False, "what": "", "timer": None}


def _enabled() -> bool:
    if os.environ.get("FUSEBACKEND_PROGRESS", "1") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _show() -> None:
    """Print the current line (the caller holds the lock)."""
    if _state["total"] <= 0:
        return
    _state["shown"] = True
    try:
        sys.stderr.write("\r\x1b[Kfusebackend: %s %d/%d" % (_state["what"], min(_state["count"], _state["total"]),
                                                           _state["total"]))
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


def _late() -> None:
    with _lock:
        if not _state["shown"]:
            _show()


def start(total: int, what: str = "compiling kernels") -> None:
    with _lock:
        _cancel()
        _state.update(total=int(total), count=0, t0=time.monotonic(), shown=False, what=what)
        if total > 0 and _enabled():           # the first line appears after DELAY even if no kernel is done yet
            timer = threading.Timer(DELAY, _late)
            timer.daemon = True
            _state["timer"] = timer
            timer.start()


def step(n: int = 1) -> None:
    with _lock:
        _state["count"] += n
        if _state["total"] <= 0 or not _enabled():
            return
        if _state["shown"] or time.monotonic() - _state["t0"] >= DELAY:
            _show()


def _cancel() -> None:
    timer = _state.get("timer")
    if timer is not None:
        timer.cancel()
        _state["timer"] = None


def done() -> None:
    with _lock:
        _cancel()
        if _state["shown"]:
            try:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
            except (AttributeError, ValueError, OSError):
                pass
        _state.update(total=0, count=0, shown=False)
