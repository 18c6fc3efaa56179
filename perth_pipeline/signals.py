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

Why a thread, and why the handler sometimes returns first: Python runs a handler in the main
thread, between two bytecodes, possibly in the middle of a write call that holds the buffer's
lock (or a manager's, or a logging handler's). The closing needs those locks, and the main
thread cannot give them back while it is inside the handler. So the closing runs in a thread of
its own. If the signal interrupted code of this package (or of ``logging``), the handler returns
at once, the interrupted call finishes and lets its lock go, and the closing thread signals the
main thread again when it is over; the handler then acts. Otherwise the handler waits for the
closing, at most ``timeout`` seconds (plus a little), then acts: the process ends all the same,
and what could not be sent by then is lost with it (and logged).

Limits: writes made after the signal (while an interrupted call finishes) go to a closed manager
and are not sent; a signal that arrives while the terminal's own ``close()`` runs ends the
process without waiting for that close (the manager is no longer live for the closing thread).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from .masking import masked_logger
from .producer import close_all

__all__ = ["install_signal_handlers"]

logger = masked_logger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
#: How long past ``timeout`` a handler waits for the closing (which keeps to ``timeout`` itself).
_GRACE = 1.0
_MARK = "_perth_pipeline_handler"


def install_signal_handlers(
    signals: Iterable[signal.Signals] = (signal.SIGTERM,), *, timeout: float = 5.0
) -> Callable[[], None]:
    """Close every manager (sending its state to the queue) before these signals act.

    Returns a function that puts back the handlers that were there before (where no one has
    replaced ours since). Calling this again for a signal it already handles changes nothing.
    A signal that is ignored (``SIG_IGN``) does not end the process, so it is left alone; so is
    one whose handler was not installed from Python (it could be neither called nor restored),
    with a warning. Only the main thread may set handlers: from another thread it raises
    ``RuntimeError``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, got {timeout!r}")
    installed: dict[signal.Signals, tuple[_Handler, Callable[[int, FrameType | None], None]]] = {}
    for signum in (signal.Signals(s) for s in signals):
        previous = signal.getsignal(signum)
        if getattr(previous, _MARK, False) or previous == signal.SIG_IGN:
            continue  # installed already, or the signal does not end the process
        if previous is None:
            logger.warning(
                "%s has a handler installed outside Python; perth-pipeline leaves it alone",
                signum.name,
                extra={"signal": signum.name},
            )
            continue
        handler = _handler(previous, timeout)
        signal.signal(signum, handler)
        installed[signum] = (previous, handler)

    def restore() -> None:
        for signum, (previous, handler) in installed.items():
            if signal.getsignal(signum) is handler:  # a handler set after ours stays
                signal.signal(signum, previous)
        installed.clear()

    return restore


class _Closing:
    """One closing of every manager, started by a signal, in a thread of its own."""

    def __init__(self, signum: int, timeout: float) -> None:
        self.signum = signum
        self.deadline = time.monotonic() + timeout + _GRACE
        self.done = threading.Event()
        self.deferred = False  # the handler returned; the main thread must be signalled again
        self._wake = [True]  # one token: whoever pops it wakes the main thread (pop is atomic)
        # not a daemon: if the main thread ends first, the interpreter waits for the closing
        self.thread = threading.Thread(target=self._run, args=(timeout,), name="perth-close-on-signal")

    def take_wake(self) -> bool:
        try:
            self._wake.pop()
        except IndexError:
            return False
        return True

    def _run(self, timeout: float) -> None:
        try:
            close_all(timeout)
        finally:
            self.done.set()
            main = threading.main_thread().ident
            if self.deferred and main is not None and self.take_wake():
                signal.pthread_kill(main, self.signum)  # the main thread, to interrupt its sleep


def _handler(previous: _Handler, timeout: float) -> Callable[[int, FrameType | None], None]:
    closing: _Closing | None = None

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal closing
        if closing is None:
            closing = _Closing(signum, timeout)
            try:
                closing.thread.start()
            except RuntimeError:  # no thread to be had (the interpreter is shutting down): just act
                closing.done.set()
        current = closing  # a second signal may run this handler again while this one waits
        if not current.done.is_set() and time.monotonic() < current.deadline:
            if _holds_our_locks(frame):
                current.deferred = True
                # the closing ended meanwhile without seeing `deferred`: act now; else it wakes us
                if not current.done.is_set() or not current.take_wake():
                    return
            else:
                current.thread.join(max(0.0, current.deadline - time.monotonic()))
        current.take_wake()  # a closing that ends late no longer wakes anyone
        if closing is current:
            closing = None
        _act(previous, signum, frame, handle)

    setattr(handle, _MARK, True)
    return handle


def _holds_our_locks(frame: FrameType | None) -> bool:
    """Whether the interrupted code is this package's (or logging's): it may hold a lock we need."""
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module != __name__ and module.partition(".")[0] in ("perth_pipeline", "logging"):
            return True
        frame = frame.f_back
    return False


def _act(
    previous: _Handler, signum: int, frame: FrameType | None, ours: Callable[[int, FrameType | None], None]
) -> None:
    """What the signal did before: the earlier Python handler, or the default action, again."""
    if callable(previous):
        previous(signum, frame)
        return
    # SIG_DFL: the default action, taken again so that the process ends as the signal says
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # delivered to this thread before it returns
    signal.signal(signum, ours)  # still here: a signal whose default does not end the process
