"""Opt-in: send what is buffered before a signal ends the process.

Python's default SIGTERM ends the process at once: ``atexit`` hooks do not run, so a terminal
told to stop (by a service manager, ``kill``, a container runtime) loses whatever its managers
had not enqueued yet. A library must not take a process's signal handlers on its own, so this
is for the terminal to call, once, from its main thread::

    from perth_pipeline import install_signal_handlers
    restore = install_signal_handlers()          # SIGTERM; timeout=5.0 seconds in all

On the signal every live :class:`~perth_pipeline.PersistenceManager` is closed (what it holds
goes to the queue, bounded by ``timeout``), then the signal does what it did before: a Python
handler installed earlier is called; otherwise the default action is taken again (for SIGTERM:
the process ends, killed by SIGTERM, as it would have). SIGINT is left alone: Python turns it
into ``KeyboardInterrupt``, which runs ``atexit`` already.

The closing runs in a thread of its own, and the handler waits for it at most ``timeout``
seconds: Python runs a handler in the main thread, between two bytecodes, possibly inside a
write call that holds the buffer's lock; then the closing waits for that lock until the
timeout, and what it could not send is lost with the process (and logged), but the process
still ends.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from .producer import close_all

__all__ = ["install_signal_handlers"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def install_signal_handlers(
    signals: Iterable[signal.Signals] = (signal.SIGTERM,), *, timeout: float = 5.0
) -> Callable[[], None]:
    """Close every manager (sending its state to the queue) before these signals act.

    Returns a function that puts back the handlers that were there before. Calling this again
    for a signal it already handles changes nothing. Only the main thread may set handlers:
    from another thread it raises ``RuntimeError``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    replaced: dict[signal.Signals, _Handler] = {}
    for signum in signals:
        previous = signal.getsignal(signum)
        if getattr(previous, "_perth_pipeline", False):
            continue  # installed already
        signal.signal(signum, _handler(previous, timeout))
        replaced[signum] = previous

    def restore() -> None:
        for signum, previous in replaced.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    return restore


def _handler(previous: _Handler, timeout: float) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        closer = threading.Thread(
            target=close_all, args=(timeout,), name="perth-close-on-signal", daemon=True
        )
        closer.start()
        closer.join(timeout + 1.0)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # the default action: done again, so that the process ends as the signal says
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    handle._perth_pipeline = True  # type: ignore[attr-defined]
    return handle
