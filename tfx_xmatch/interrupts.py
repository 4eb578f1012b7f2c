"""Ctrl-C and SIGTERM end a command with one line and the shell's exit code, after its clean-ups.

Python turns SIGINT into ``KeyboardInterrupt`` but leaves SIGTERM (what a scheduler, ``kill``
or ``docker stop`` sends) to its default action, which ends the process at once: no ``finally``
block runs, so the temporaries of an atomic write stay behind. ``sigterm_raises`` makes
SIGTERM raise ``Terminated``, a ``KeyboardInterrupt``, so both signals unwind the same way, and
``run_interruptibly`` runs a command under it: on an interruption it prints what happened and
returns 128 + the signal's number, as a shell reports a process a signal ended (130 for Ctrl-C,
143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt``."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within it, SIGTERM raises ``Terminated`` in the main thread; the previous handler is back
    after it. (In another thread, where Python cannot install signal handlers, it does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption(error: BaseException) -> Optional[KeyboardInterrupt]:
    """The ``KeyboardInterrupt`` (or ``Terminated``) that ``error`` is or was raised from, else
    None. Beam re-raises one that reached a transform as ``RuntimeError("KeyboardInterrupt
    [while running ...]")``, chained to the original."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_interruptibly(command: str, run: Callable[[], int], hint: str = "") -> int:
    """``run()`` with SIGTERM raising; on an interruption (or an error raised from one) prints
    ``<command>: interrupted by SIGINT[; hint]`` to stderr and returns 130 (143 for SIGTERM).
    Other errors propagate."""
    try:
        with sigterm_raises():
            return run()
    except Exception as error:  # Beam re-raises an interruption in a transform as a RuntimeError
        interrupt = interruption(error)
        if interrupt is None:
            raise
    except KeyboardInterrupt as error:
        interrupt = error
    signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
    print(f"{command}: interrupted by {signum.name}" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    return 128 + int(signum)
